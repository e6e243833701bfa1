"""Data order and batches for training: a pure function of (seed, step, rank).

Epoch e visits the training sequences in the order of a permutation drawn from
``seed + e``; rank r of W takes every W-th sequence of it (all ranks get the same number of
batches, as FSDP's collectives require) and cuts it into batches, dropping the remainder.
Because batch ``step`` is computed, not iterated, ``--resume`` continues on exactly the batch
the interrupted run would have taken next, with nothing to save but the step.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from dflare_sgl.training.data import Sequence


@dataclass
class Batch:
    """Right-padded sequences: ``input_ids [b, S]`` int64, ``loss_mask [b, S]`` bool,
    ``attention_mask [b, S]`` int64 (1 = real token); for target-labelled data
    ``target_ids [b, S]`` int64 (-1 off the loss mask) and the soft targets ``topk_ids``
    int64 / ``topk_logprobs`` float32 ``[b, S, K]`` (ids -1 and log-probabilities 0 off it)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in astuple(self)))

    def row(self, i: int, length: int) -> Batch:
        """Sequence ``i`` alone, its first ``length`` positions."""
        return Batch(*(None if t is None else t[i : i + 1, :length] for t in astuple(self)))


class DataOrder:
    def __init__(
        self,
        num_sequences: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_sequences, self.batch_size = num_sequences, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = num_sequences // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_sequences} training sequences cannot fill one batch of {batch_size} on "
                f"each of {world_size} process(es): lower --batch-size or generate more data"
            )

    def indices(self, step: int) -> list[int]:
        """Sequence indices of this rank's batch at global step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(
            self.num_sequences, generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        mine = perm[self.rank :: self.world_size]
        return mine[index * self.batch_size : (index + 1) * self.batch_size].tolist()


def collate(sequences: list[Sequence], max_len: int | None = None) -> Batch:
    """Right-pad :class:`Sequence` s to the longest (cut at ``max_len``); target labels and soft
    targets are batched when every sequence has them."""
    width = max(len(s.input_ids) for s in sequences)
    width = min(width, max_len) if max_len else width
    sequences = [s.cut(width) for s in sequences]
    b = len(sequences)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    loss_mask = torch.zeros(b, width, dtype=torch.bool)
    attention = torch.zeros(b, width, dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s.input_ids)
        input_ids[i, :n], loss_mask[i, :n], attention[i, :n] = s.input_ids, s.loss_mask, 1
    batch = Batch(input_ids, loss_mask, attention)
    if all(s.target_ids is not None for s in sequences):
        batch.target_ids = torch.full((b, width), -1, dtype=torch.long)
        for i, s in enumerate(sequences):
            batch.target_ids[i, : len(s.target_ids)] = s.target_ids
    if all(s.topk_ids is not None for s in sequences):
        k = sequences[0].topk_ids.shape[-1]
        batch.topk_ids = torch.full((b, width, k), -1, dtype=torch.long)
        batch.topk_logprobs = torch.zeros(b, width, k)
        for i, s in enumerate(sequences):
            batch.topk_ids[i][loss_mask[i]] = s.topk_ids
            batch.topk_logprobs[i][loss_mask[i]] = s.topk_logprobs
    return batch
