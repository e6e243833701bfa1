"""Data order and batches for training: a pure function of (seed, step, rank).

Epoch e visits the training sequences in the order of a permutation drawn from
``seed + e``; rank r of W takes every W-th sequence of it (all ranks get the same number of
batches, as FSDP's collectives require) and cuts it into batches, dropping the remainder.
Because batch ``step`` is computed, not iterated, ``--resume`` continues on exactly the batch
the interrupted run would have taken next, with nothing to save but the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Right-padded sequences: ``input_ids [b, S]`` int64, ``loss_mask [b, S]`` bool,
    ``attention_mask [b, S]`` int64 (1 = real token)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.loss_mask, self.attention_mask)))


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


def collate(
    sequences: list[tuple[torch.Tensor, torch.Tensor]], max_len: int | None = None
) -> Batch:
    """Right-pad ``(input_ids, loss_mask)`` pairs to the longest (cut at ``max_len``)."""
    width = max(len(ids) for ids, _ in sequences)
    width = min(width, max_len) if max_len else width
    b = len(sequences)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    loss_mask = torch.zeros(b, width, dtype=torch.bool)
    attention = torch.zeros(b, width, dtype=torch.long)
    for i, (ids, mask) in enumerate(sequences):
        n = min(len(ids), width)
        input_ids[i, :n], loss_mask[i, :n], attention[i, :n] = ids[:n], mask[:n], 1
    return Batch(input_ids, loss_mask, attention)
