"""One training forward: target context, all blocks of each sequence in one draft pass, and
the per-position statistics the losses read.

Cost notes (CPU is the floor this must run on): the target runs without its ``lm_head``
(only hidden states are needed); the frozen ``lm_head`` is applied only to block positions
that have a label (not to the anchor token, nor to padded tails); it has no gradient of its
own, so its backward is a single matmul into the draft. A draft with a reduced vocabulary
(``draft_vocab_ids``, N of the target's V tokens) is trained over those N rows of the head
only, as it drafts: the head's forward and backward cost N / V of the full ones, and a label
outside the N is a position the draft cannot get right (``BlockStats.in_vocab``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dflare_sgl.draft_model import capture_target_hidden
from dflare_sgl.training.blocks import Blocks, block_attention_mask, build_blocks, sample_anchors
from dflare_sgl.training.loader import Batch
from dflare_sgl.training.losses import soft_target_kl, token_stats


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast over the fp32 weights, or nothing (``dtype`` None)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class BlockStats:
    """Per block position (``[N blocks, B-1]``): ``ce`` float32, ``correct`` / ``valid`` bool;
    ``in_vocab`` bool (the label is a token the draft can propose), None for a draft that
    proposes every token; ``kl`` float32, the divergence from the target's soft targets
    (:func:`soft_target_kl`, 0 where invalid), None unless asked for."""

    ce: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    in_vocab: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def first_position_accuracy(self) -> torch.Tensor:
        first = self.valid[:, 0]
        return (self.correct[:, 0] & first).sum() / first.sum().clamp_min(1)

    def estimated_tau(self) -> torch.Tensor:
        """1 + mean accepted prefix per block, if the target's greedy choice were the data."""
        run = (self.correct & self.valid).to(torch.int32).cumprod(-1).sum(-1)
        has = self.valid[:, 0]
        return 1 + (run * has).sum() / has.sum().clamp_min(1)


@torch.no_grad()
def target_context(
    target: PreTrainedModel, batch: Batch, layer_ids: list[int], dtype: torch.dtype | None
) -> torch.Tensor:
    """Captured target hidden states ``[b, S, T, H]`` of a batch (no logits computed)."""
    with autocast(batch.input_ids.device, dtype):
        out = target.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
    return capture_target_hidden(out.hidden_states, layer_ids)


def draft_block_stats(
    draft: nn.Module,
    target: PreTrainedModel,
    batch: Batch,
    num_anchors: int,
    block_size: int,
    mask_token_id: int,
    layer_ids: list[int],
    generator: torch.Generator,
    dtype: torch.dtype | None,
    context: torch.Tensor | None = None,
    soft_targets: bool = False,
) -> BlockStats:
    """Sample anchors, run every block of every sequence through the draft, score them.

    ``context``: the batch's captured target hidden states ``[b, S, T, H]`` when already known
    (:mod:`context_cache`); None computes them. Labels follow the target where the batch has
    ``target_ids``; ``soft_targets`` adds the KL to its top-k (the batch must carry them)."""
    if context is None:
        context = target_context(target, batch, layer_ids, dtype)
    b, s = batch.input_ids.shape
    anchors, anchor_valid = sample_anchors(batch.loss_mask, num_anchors, generator)
    blocks: Blocks = build_blocks(
        batch.input_ids,
        batch.loss_mask,
        anchors,
        anchor_valid,
        block_size,
        mask_token_id,
        batch.target_ids,
    )
    mask = block_attention_mask(anchors, block_size, s)
    context_positions = torch.arange(s, device=anchors.device).expand(b, s)
    embed = target.get_input_embeddings()
    with torch.no_grad():  # float32: the draft's residual stream stays fp32 under autocast
        noise = embed(blocks.token_ids).float()
        # DFly's correction head, teacher-forced: slot k sees the text token before it.
        dfly = getattr(draft, "hidden_correction", None) is not None
        prev = embed(blocks.prev_token_ids).float() if dfly else None
    with autocast(batch.input_ids.device, dtype):
        hidden = draft(
            position_ids=torch.cat([context_positions, blocks.positions], dim=1),
            attention_mask=mask,
            noise_embedding=noise,
            target_hidden=context,
            prev_embedding=prev,
        )
        k = anchors.shape[1]
        predicted = hidden.view(b, k, block_size, -1)[:, :, 1:]  # position 0 is x_a itself
        rows = predicted[blocks.valid]
        head = target.get_output_embeddings()
        labels = blocks.labels[blocks.valid]
        vocab_ids = getattr(draft, "draft_vocab_ids", None)
        soft_ids = None
        if soft_targets:
            if batch.topk_ids is None:
                raise ValueError(
                    "the soft-target KL needs top-k soft targets in the data: make it with "
                    "`dflare gen-data --responses labelled --top-k K`, or pass --kl-weight 0"
                )
            rows_of = torch.arange(b, device=anchors.device)[:, None, None].expand_as(blocks.valid)
            where = (rows_of[blocks.valid], blocks.label_positions[blocks.valid])
            soft_ids, soft_logprobs = batch.topk_ids[where], batch.topk_logprobs[where]
        if vocab_ids is None:
            logits = head(rows)
        else:
            bias = None if head.bias is None else head.bias[vocab_ids]
            logits = F.linear(rows, head.weight[vocab_ids], bias)
            index = draft_vocab_index(vocab_ids, head.weight.shape[0])
            labels = index[labels]
            if soft_ids is not None:
                soft_ids = torch.where(soft_ids >= 0, index[soft_ids.clamp_min(0)], -1)
    ce_rows, correct_rows = token_stats(logits, labels)
    valid = blocks.valid
    ce = torch.zeros(valid.shape, dtype=torch.float32, device=rows.device)
    ce = ce.masked_scatter(valid, ce_rows)
    correct = torch.zeros_like(valid).masked_scatter(valid, correct_rows)
    in_vocab = kl = None
    if vocab_ids is not None:
        in_vocab = torch.ones_like(valid).masked_scatter(valid, labels >= 0).flatten(0, 1)
    if soft_ids is not None:
        kl_rows = soft_target_kl(logits, soft_ids, soft_logprobs)
        kl = torch.zeros(valid.shape, dtype=kl_rows.dtype, device=rows.device)
        kl = kl.masked_scatter(valid, kl_rows).flatten(0, 1)
    return BlockStats(
        ce.flatten(0, 1), correct.flatten(0, 1), valid.flatten(0, 1), in_vocab, kl
    )


def draft_vocab_index(vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 ``[vocab_size]``: each target token's row in a draft vocabulary ``vocab_ids``
    ``[N]``, -1 for tokens outside it."""
    index = torch.full((vocab_size,), -1, dtype=torch.int64, device=vocab_ids.device)
    index[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
    return index
