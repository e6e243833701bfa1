"""Layer-mixing context K/V: the draft's view of the target's hidden states.

From the captured target hidden states of N tokens, every draft layer d gets its own
context keys and values::

    ctx_d = hidden_norm(sum_t alpha[d, t] * hs_t)        # DFlare, alpha = softmax(W)[d]
    ctx   = hidden_norm(fc(concat_t hs_t))               # DFlash, one ctx for every layer
    K_d   = rope(k_norm_d(k_proj_d(ctx_d)), pos)          V_d = v_proj_d(ctx_d)

and :func:`layer_mix_kv` stores them into each layer's paged KV cache at given slots.
:func:`context_kv` is the plain PyTorch definition; the draft model's own forward uses it,
so the op, its C++/CUDA kernels and the model all share one reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflare_sgl.primitives import apply_rope, rms_norm


@dataclass
class LayerMixWeights:
    """Stacked draft weights the op reads, built once by ``DFlareDraftModel.layer_mix_weights``.

    Shapes (D draft layers, T captured target layers, H hidden, KVH kv heads, hd head dim):
      fusion_probs [D, T] float32 softmaxed (DFlare) or None; fc_weight [H, T*H] (DFlash)
      or None; hidden_norm_weight [H]; k_proj_weight / v_proj_weight [D, KVH*hd, H];
      k_proj_bias / v_proj_bias [D, KVH*hd] or None; k_norm_weight [D, hd];
      cos_sin_cache [max_pos, hd] float32 (see ``primitives.build_cos_sin_cache``).
    """

    fusion_probs: torch.Tensor | None
    fc_weight: torch.Tensor | None
    hidden_norm_weight: torch.Tensor
    k_proj_weight: torch.Tensor
    v_proj_weight: torch.Tensor
    k_proj_bias: torch.Tensor | None
    v_proj_bias: torch.Tensor | None
    k_norm_weight: torch.Tensor
    eps: float
    cos_sin_cache: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.k_proj_weight.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k_norm_weight.shape[-1]


def _bias(bias: torch.Tensor | None, d: int) -> torch.Tensor | None:
    return None if bias is None else bias[d]


def context_kv(
    hidden: torch.Tensor, w: LayerMixWeights, positions: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every draft layer's context K and V, in ``hidden``'s dtype.

    Args:
      hidden: ``[..., N, T, H]`` captured target hidden states (layer t is ``hs[ids[t]+1]``).
      positions: ``[..., N]`` int64 absolute positions of the N tokens.
    Returns:
      Two lists of D tensors ``[..., N, KVH, hd]``: K (k_norm and RoPE applied) and V.
    """
    *lead, n, t, h = hidden.shape
    if w.fc_weight is not None:
        shared = rms_norm(
            torch.nn.functional.linear(hidden.reshape(*lead, n, t * h), w.fc_weight),
            w.hidden_norm_weight,
            w.eps,
        )
        mixed = None
    else:
        probs = w.fusion_probs.to(hidden.dtype)
        mixed = rms_norm(
            torch.einsum("...nth,dt->...ndh", hidden, probs), w.hidden_norm_weight, w.eps
        )
    keys, values = [], []
    for d in range(w.num_layers):
        ctx = shared if mixed is None else mixed[..., d, :]
        k = torch.nn.functional.linear(ctx, w.k_proj_weight[d], _bias(w.k_proj_bias, d))
        v = torch.nn.functional.linear(ctx, w.v_proj_weight[d], _bias(w.v_proj_bias, d))
        k = rms_norm(k.unflatten(-1, (-1, w.head_dim)), w.k_norm_weight[d], w.eps)
        keys.append(apply_rope(k, positions, w.cos_sin_cache))
        values.append(v.unflatten(-1, (-1, w.head_dim)))
    return keys, values


def layer_mix_kv_reference(
    hidden: torch.Tensor,
    w: LayerMixWeights,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
) -> None:
    """Plain PyTorch :func:`layer_mix_kv`: ``k_caches[d][slots[n]] = K_d[n]`` (same for V)."""
    keys, values = context_kv(hidden, w, positions)
    for d in range(w.num_layers):
        k_caches[d][slots] = keys[d].to(k_caches[d].dtype)
        v_caches[d][slots] = values[d].to(v_caches[d].dtype)
