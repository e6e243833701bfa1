"""Training blocks: anchors, block inputs / labels, and the block attention mask.

For a batch of right-padded sequences ``[b, S]`` with a loss mask (response tokens), every
sequence gets up to K anchors ``a`` inside its loss mask. Anchor a makes the block
``[x_a, MASK x (B-1)]`` at positions ``a .. a+B-1``, whose position k predicts ``x_{a+k}``.
All K blocks of a sequence run in ONE draft forward: queries are the ``K*B`` block tokens, keys
are ``[S context tokens (target hidden states), K*B block tokens]``, and a block sees the
context strictly before its anchor plus its own block, never another block. That is exactly
what a block sees at inference, where ``x_a`` is the last committed token and the context is
the target hidden states of the tokens before it.

Labels are the text's own tokens, or, for target-labelled text, the target's greedy tokens
(``target_ids``): block position k's label is then the target's token after
``x_0..x_{a+k-1}``, which is its greedy continuation of the anchor only while the text agrees
with it, so positions after the first disagreement have no label (the first disagreeing
position has one: the target's token there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` distinct anchors per sequence, uniformly, sorted.

    A position a qualifies when it and ``a+1`` are in the loss mask (the block has at least
    one label). Args: ``loss_mask [b, S]`` bool; ``generator`` on the CPU (draws are the same
    on every device). Returns ``anchors [b, K]`` int64 and ``anchor_valid [b, K]`` bool; a
    sequence with fewer than K candidates fills its tail with invalid anchors at position 0.
    """
    b, s = loss_mask.shape
    k = min(num_anchors, s)
    candidate = torch.zeros_like(loss_mask)
    candidate[:, :-1] = loss_mask[:, :-1] & loss_mask[:, 1:]
    scores = torch.rand(b, s, generator=generator).to(loss_mask.device)
    scores = torch.where(candidate, scores, -1.0)
    picked, anchors = scores.topk(k, dim=1)
    valid = picked >= 0
    anchors = torch.where(valid, anchors, 0)
    # Sorted, invalid anchors last: the block layout follows the sequence order.
    order = torch.where(valid, anchors, s).argsort(dim=1)
    return anchors.gather(1, order), valid.gather(1, order)


@dataclass
class Blocks:
    """The draft's inputs and targets for a batch (b sequences, K blocks of B tokens each).

    ``token_ids [b, K*B]`` block tokens ``[x_a, MASK...]``; ``positions [b, K*B]`` their
    absolute positions; ``prev_token_ids [b, K*B]`` the text token before each slot's label
    (``x_{a+k-1}``; ``x_a`` at slot 0), what DFly's correction head is teacher-forced with;
    ``labels [b, K, B-1]`` ``x_{a+k}`` or the target's token there (0 where invalid);
    ``valid [b, K, B-1]`` the label exists and is in the loss mask (and, for target labels,
    the text agrees with the target before it); ``label_positions [b, K, B-1]`` the labels'
    sequence positions (clamped inside it); ``anchors [b, K]``.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    prev_token_ids: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    label_positions: torch.Tensor
    anchors: torch.Tensor


def build_blocks(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    target_ids: torch.Tensor | None = None,
) -> Blocks:
    """Blocks for ``input_ids / loss_mask [b, S]`` at ``anchors / anchor_valid [b, K]``;
    ``target_ids [b, S]`` (the target's greedy token at each loss-mask position) makes the
    labels follow the target instead of the text."""
    b, s = input_ids.shape
    k = anchors.shape[1]
    offsets = torch.arange(block_size, device=anchors.device)
    positions = anchors[:, :, None] + offsets  # [b, K, B]
    token_ids = torch.full_like(positions, mask_token_id)
    token_ids[:, :, 0] = input_ids.gather(1, anchors)
    label_pos = positions[:, :, 1:]
    inside = label_pos < s
    label_pos = label_pos.clamp_max(s - 1).flatten(1)
    labelled_by = input_ids if target_ids is None else target_ids
    labels = labelled_by.gather(1, label_pos).view(b, k, block_size - 1)
    valid = inside & anchor_valid[:, :, None] & loss_mask.gather(1, label_pos).view_as(inside)
    if target_ids is not None:
        # Label k needs x_{a+j} == the target's token for every j < k.
        agrees = (input_ids == target_ids).gather(1, label_pos).view_as(inside)
        before = torch.cat([torch.ones_like(agrees[..., :1]), agrees[..., :-1]], dim=-1)
        valid &= before.cummin(dim=-1).values
    prev_pos = torch.maximum(positions - 1, anchors[:, :, None]).clamp_max(s - 1)
    return Blocks(
        token_ids=token_ids.flatten(1),
        positions=positions.flatten(1),
        prev_token_ids=input_ids.gather(1, prev_pos.flatten(1)),
        labels=torch.where(valid, labels, 0),
        valid=valid,
        label_positions=label_pos.view_as(inside),
        anchors=anchors,
    )


def _visible(anchors: torch.Tensor, block_size: int, context_len: int):
    """The mask rule as a flex_attention ``mask_mod``: query q (block ``q // B``) sees key kv
    when kv is a context token before the block's anchor, or a token of the same block."""

    def mask_mod(b, h, q, kv):
        block = q // block_size
        before_anchor = kv < anchors[b, block]
        same_block = (kv - context_len) // block_size == block
        return torch.where(kv < context_len, before_anchor, same_block)

    return mask_mod


def block_attention_mask(
    anchors: torch.Tensor, block_size: int, context_len: int
) -> torch.Tensor | BlockMask:
    """The attention mask of one draft forward over all blocks, for ``anchors [b, K]``.

    On CUDA a flex_attention ``BlockMask`` (sparse: the draft runs flex_attention); elsewhere
    the same rule as an SDPA boolean mask ``[b, 1, K*B, S + K*B]`` (True = attend).
    """
    b, k = anchors.shape
    q_len, kv_len = k * block_size, context_len + k * block_size
    mask_mod = _visible(anchors, block_size, context_len)
    if anchors.device.type == "cuda":
        return create_block_mask(mask_mod, b, None, q_len, kv_len, device=anchors.device)
    dev = anchors.device
    return mask_mod(
        torch.arange(b, device=dev)[:, None, None, None],
        None,
        torch.arange(q_len, device=dev)[None, None, :, None],
        torch.arange(kv_len, device=dev)[None, None, None, :],
    )
