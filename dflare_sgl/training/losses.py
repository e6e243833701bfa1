"""Training losses of a block draft, exactly as DESIGN.md section 4 defines them.

Every block is ``[x_a, MASK x (B-1)]``; its position k = 1..B-1 predicts ``y_k = x_{a+k}``.
The losses read three per-position tensors of shape ``[N blocks, B-1]`` (column k-1 is
position k), which :func:`token_stats` derives from the logits:

* ``ce``: ``CE_k = -log q_k(y_k)`` (so ``p_k = exp(-CE_k)``), float;
* ``correct``: ``argmax q_k == y_k``, bool;
* ``valid``: the label exists and lies inside the loss mask, bool. Blocks near the end of a
  sequence are padded: their trailing positions are invalid and count nowhere.
* ``in_vocab`` (optional, all True by default): the label is a token the draft can propose. A
  draft trained with a reduced vocabulary (``draft_vocab_ids``) cannot propose the others: such
  a position is never accepted, so it is wrong, has no CE to train (its ``ce`` is 0) and ends
  its block's accepted prefix.

Terms (``w_k = exp(-(k-1)/gamma)``):

* :class:`PositionWeightedCE`: ``sum w_k CE_k / sum w_k`` over all valid in-vocabulary
  positions of the batch; gamma fixed or ramped linearly over training (:class:`GammaSchedule`);
  ``gamma=None`` is plain CE (w = 1).
* :class:`FirstErrorFocalLoss`: ``w_{j*} CE_{j*}`` at the first wrong valid position j*,
  averaged over the blocks that have an error there the draft could fix (j* in vocabulary; 0
  when no block has one).
* :class:`ChainLoss`: ``-R`` with ``R = sum_k P_k / n``, ``P_k = exp(sum_{j<=k} log p_j)`` (0
  from a position out of the vocabulary on), the normalised expected accepted length, averaged
  over blocks; n is the block's number of valid positions (B-1 for an unpadded block).
* :class:`SoftTargetKL` (target-labelled data with top-k soft targets): ``sum w_k KL_k / sum
  w_k`` over the valid positions, ``KL_k`` the divergence of the draft from the target's
  distribution there, seen through the target's top-k (:func:`soft_target_kl`).

:class:`AlignmentLoss` sums them: ``L = L_pos + alpha_f L_fe + alpha_c L_chain + alpha_kl L_kl``
(DESIGN.md's ``L_chain = -alpha_c R`` read with the weight applied once). A weight of 0
switches a term off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(CE [...], correct bool [...])`` of ``logits [..., V]`` vs ``labels``; CE in
    float32 (float64 for float64 logits). A label -1 (not in the head's vocabulary) has CE 0,
    no gradient, and is never correct."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(wide.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=-1)
    correct = wide.argmax(-1) == labels  # (argmax over bf16 is ~4x slower on CPU)
    return ce.view(labels.shape), correct


def soft_target_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-row ``KL(p || q)`` of the draft ``q = softmax(logits [R, V'])`` from the target's
    distribution p, known through its top-k: ``topk_ids [R, K]`` (rows of ``logits``; -1 for a
    token the draft's head does not have) and their log-probabilities over the target's whole
    vocabulary ``topk_logprobs [R, K]``. Returns float32 ``[R]`` (float64 for float64 logits).

    Both distributions are read on the same K' + 1 outcomes: each listed token the draft has,
    and "any other token" (target mass ``1 - sum p_i``, draft mass ``1 - sum q_i``), so the
    value is a true KL divergence: >= 0, and 0 exactly when the draft gives every listed token
    the target's probability. A row whose draft has no other token (a head no larger than the
    list) has no "other" outcome to match and leaves it out.
    """
    logq = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    listed = topk_ids >= 0
    safe_ids = topk_ids.clamp_min(0)
    p = topk_logprobs.to(logq.dtype).exp() * listed
    head = (p * (topk_logprobs.to(logq.dtype) - logq.gather(-1, safe_ids))).sum(-1)
    hit = torch.zeros_like(logq).scatter_add_(-1, safe_ids, listed.to(logq.dtype)) > 0
    has_other = ~hit.all(-1)
    # Rows without another token get zeros instead of -inf: no NaN in the backward.
    other = torch.where(has_other[:, None], logq.masked_fill(hit, float("-inf")), 0.0)
    log_q_other = other.logsumexp(-1)
    p_other = (1 - p.sum(-1)).clamp_min(0)
    tail = torch.xlogy(p_other, p_other) - p_other * log_q_other
    return head + tail * has_other


def position_weights(num_positions: int, gamma: float | None, like: torch.Tensor) -> torch.Tensor:
    """``w_k = exp(-(k-1)/gamma)`` for k = 1..num_positions (all ones when gamma is None)."""
    k = torch.arange(num_positions, dtype=like.dtype, device=like.device)
    return torch.ones_like(k) if gamma is None else torch.exp(-k / gamma)


@dataclass(frozen=True)
class GammaSchedule:
    """gamma ramped linearly from ``start`` (first step) to ``end`` (last step); equal ends give
    a fixed gamma, ``start=None`` switches positional weighting off."""

    start: float | None
    end: float | None

    def __post_init__(self) -> None:
        if (self.start is None) != (self.end is None):
            raise ValueError("a gamma schedule needs both ends or neither")
        if self.start is not None and min(self.start, self.end) <= 0:
            raise ValueError(f"gamma must be > 0, got {self.start}:{self.end}")

    @classmethod
    def parse(cls, text: str) -> GammaSchedule:
        """``"7"`` (fixed) or ``"4.5:10.5"`` (progressive)."""
        start, _, end = text.partition(":")
        try:
            return cls(float(start), float(end or start))
        except ValueError as e:
            raise ValueError(f"gamma must look like 7 or 4.5:10.5, got {text!r} ({e})") from e

    def at(self, step: int, total_steps: int) -> float | None:
        if self.start is None:
            return None
        progress = step / max(total_steps - 1, 1)
        return self.start + (self.end - self.start) * min(progress, 1.0)


def default_gamma(block_size: int) -> float:
    """DFlash's choices: 7 for B=16, 5 for B=10, 4 for B=8; in proportion elsewhere."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, 7.0 * block_size / 16)


class PositionWeightedCE:
    def __call__(
        self,
        ce: torch.Tensor,
        valid: torch.Tensor,
        gamma: float | None,
        in_vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        trainable = valid if in_vocab is None else valid & in_vocab
        w = position_weights(ce.shape[-1], gamma, ce) * trainable
        return (w * ce).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


class FirstErrorFocalLoss:
    def __call__(
        self,
        ce: torch.Tensor,
        correct: torch.Tensor,
        valid: torch.Tensor,
        gamma: float | None,
        in_vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        errors = valid & ~correct
        first = errors.to(torch.int8).argmax(-1, keepdim=True)  # j* - 1 (0 where no error)
        has_error = errors.any(-1)
        if in_vocab is not None:  # an error out of the vocabulary has nothing to train
            has_error = has_error & in_vocab.gather(-1, first).squeeze(-1)
        w = position_weights(ce.shape[-1], gamma, ce)
        per_block = (w[first] * ce.gather(-1, first)).squeeze(-1)
        return (per_block * has_error).sum() / has_error.sum().clamp_min(1)


class ChainLoss:
    def __call__(
        self, ce: torch.Tensor, valid: torch.Tensor, in_vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        prefix_prob = torch.exp(-(ce * valid).cumsum(-1))  # P_k; invalid tail is masked below
        if in_vocab is not None:  # p_j = 0 at a label out of the vocabulary, and after it
            prefix_prob = prefix_prob * (in_vocab | ~valid).to(ce.dtype).cumprod(-1)
        count = valid.sum(-1)
        expected_len = (prefix_prob * valid).sum(-1) / count.clamp_min(1)  # R per block
        has_label = count > 0
        return -(expected_len * has_label).sum() / has_label.sum().clamp_min(1)


class SoftTargetKL:
    """``sum w_k KL_k / sum w_k`` over the valid positions (``kl [N, B-1]``, 0 elsewhere)."""

    def __call__(self, kl: torch.Tensor, valid: torch.Tensor, gamma: float | None) -> torch.Tensor:
        w = position_weights(kl.shape[-1], gamma, kl) * valid
        return (w * kl).sum() / w.sum().clamp_min(torch.finfo(kl.dtype).tiny)


@dataclass
class LossTerms:
    """The total and its parts (plain floats for logging; None where a term is off)."""

    total: torch.Tensor
    position_ce: float
    first_error: float | None
    chain: float | None
    soft_target_kl: float | None = None


class AlignmentLoss:
    """``L = L_pos + focal_weight * L_fe + chain_weight * L_chain + kl_weight * L_kl``; weight
    0 skips a term."""

    def __init__(
        self, focal_weight: float = 0.3, chain_weight: float = 0.1, kl_weight: float = 0.0
    ) -> None:
        if min(focal_weight, chain_weight, kl_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.focal_weight, self.chain_weight, self.kl_weight = focal_weight, chain_weight, kl_weight
        self.position_ce, self.first_error, self.chain, self.soft_target = (
            PositionWeightedCE(),
            FirstErrorFocalLoss(),
            ChainLoss(),
            SoftTargetKL(),
        )

    def __call__(
        self,
        ce: torch.Tensor,
        correct: torch.Tensor,
        valid: torch.Tensor,
        gamma: float | None,
        in_vocab: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> LossTerms:
        pos = self.position_ce(ce, valid, gamma, in_vocab)
        total, fe, chain, soft = pos, None, None, None
        if self.focal_weight:
            fe_t = self.first_error(ce, correct, valid, gamma, in_vocab)
            total, fe = total + self.focal_weight * fe_t, fe_t.item()
        if self.chain_weight:
            chain_t = self.chain(ce, valid, in_vocab)
            total, chain = total + self.chain_weight * chain_t, chain_t.item()
        if self.kl_weight:
            if kl is None:
                raise ValueError("kl_weight > 0 needs the per-position KL (soft targets)")
            kl_t = self.soft_target(kl, valid, gamma)
            total, soft = total + self.kl_weight * kl_t, kl_t.item()
        return LossTerms(total, pos.item(), fe, chain, soft)
