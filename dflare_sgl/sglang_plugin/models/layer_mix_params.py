"""What ``layer_mix_kv`` reads from an SGLang draft model, without copies that go stale.

* :func:`stack_in_place`: the per-layer projection (and k_norm) weights live in one stacked
  tensor whose rows ARE the parameters' storage. SGLang's loaders copy into parameters, at
  start-up and in live weight updates (``update_weights_from_disk`` / ``_from_tensor``), so
  the stacked tensor the op reads is always current, and no second copy takes KV-pool memory.
* :func:`context_rope_table`: the draft attention's RoPE table, checked to be the layout the
  op rotates (neox rotate-half over whole heads). SGLang's DFlash layers also build
  interleaved (``rope_is_neox_style: false``) and partial (``rope_dim`` /
  ``partial_rotary_factor``) rotary embeddings; their context keys would be rotated wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def stack_in_place(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``[len(params), *shape]``: a tensor whose rows are the parameters' storage.

    Each parameter keeps its identity (and its ``weight_loader``); only its ``.data`` becomes a
    row view. Returns the stacked tensor.
    """
    first = params[0]
    stacked = torch.empty((len(params), *first.shape), dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for p, row in zip(params, stacked, strict=True):
            row.copy_(p.data)
            p.data = row
    return stacked


def still_stacked(params: Sequence[nn.Parameter], stacked: torch.Tensor) -> bool:
    """Whether every parameter still lives in its row of ``stacked`` (a loader that replaced
    a parameter's tensor instead of copying into it would break that)."""
    return all(p.data_ptr() == row.data_ptr() for p, row in zip(params, stacked, strict=True))


def context_rope_table(rotary_emb: nn.Module, head_dim: int) -> torch.Tensor:
    """``rotary_emb.cos_sin_cache`` as float32, after checking it is the layout the op reads."""
    if not getattr(rotary_emb, "is_neox_style", False):
        raise ValueError(
            "the draft's rotary embedding is interleaved (rope_is_neox_style: false): "
            "layer_mix_kv implements the neox (rotate-half) layout of Qwen3 drafts only"
        )
    rotary_dim = getattr(rotary_emb, "rotary_dim", None)
    if rotary_dim != head_dim:
        raise ValueError(
            f"the draft rotates {rotary_dim} of {head_dim} head dims (partial rotary): "
            "layer_mix_kv rotates whole heads; use a draft without rope_dim / "
            "partial_rotary_factor"
        )
    return rotary_emb.cos_sin_cache.float().contiguous()


class StackedParameters:
    """D same-shaped parameters stored as the rows of one tensor (:func:`stack_in_place`)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self._stacked = stack_in_place(self.params)

    def tensor(self) -> torch.Tensor:
        """The stacked tensor, re-stacked first if a loader replaced a parameter's tensor."""
        if not still_stacked(self.params, self._stacked):
            self._stacked = stack_in_place(self.params)
        return self._stacked
