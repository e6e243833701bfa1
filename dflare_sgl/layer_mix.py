"""Layer-mixing context K/V: the draft's view of the target's hidden states.

From the captured target hidden states of N tokens, every draft layer d gets its own
context keys and values::

    ctx_d = hidden_norm(sum_t alpha[d, t] * hs_t)        # DFlare, alpha = softmax(W)[d]
    ctx   = hidden_norm(fc(concat_t hs_t))               # DFlash, one ctx for every layer
    ctx_d = hidden_norm(fc(concat_t hs_t) + sum_t alpha[d, t] * hs_t)          # DFly
    K_d   = rope(k_norm_d(k_proj_d(ctx_d)), pos)          V_d = v_proj_d(ctx_d)

and :func:`layer_mix_kv` stores them into each layer's paged KV cache at given slots.
:func:`context_kv` is the plain PyTorch definition; the draft model's own forward uses it,
so the op, its C++/CUDA kernels and the model all share one reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflare_sgl._ext import has_kernel
from dflare_sgl.primitives import apply_rope, rms_norm

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_DTYPES = _HIDDEN_DTYPES + (torch.float8_e4m3fn, torch.float8_e5m2)
# Per-layer weights that may be strided across layers (each layer dense).
_PER_LAYER = ("k_proj_weight", "v_proj_weight", "k_proj_bias", "v_proj_bias")


@dataclass
class LayerMixWeights:
    """Stacked draft weights the op reads, built once by ``DFlareDraftModel.layer_mix_weights``.

    Shapes (D draft layers, T captured target layers, H hidden, KVH kv heads, hd head dim):
      fusion_probs [D, T] float32 softmaxed (DFlare, DFly) or None; fc_weight [H, T*H]
      (DFlash, DFly) or None (at least one is set); hidden_norm_weight [H]; k_proj_weight /
      v_proj_weight [D, KVH*hd, H]; k_proj_bias / v_proj_bias [D, KVH*hd] or None (both or
      neither); k_norm_weight [D, hd]; cos_sin_cache [max_pos, hd] float32 (see
      ``primitives.build_cos_sin_cache``).

    The projections may be views with any stride between layers (each layer dense): a serving
    engine passes its parameters' own storage. When each layer's V rows follow its K rows in
    memory the kernels project K and V in one GEMM.
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
    ctx = 0  # [..., N, H] (one context) or [..., N, D, H] (one per layer), before the norm
    if w.fc_weight is not None:
        ctx = torch.nn.functional.linear(hidden.reshape(*lead, n, t * h), w.fc_weight)
    if w.fusion_probs is not None:
        mixed = torch.einsum("...nth,dt->...ndh", hidden, w.fusion_probs.to(hidden.dtype))
        ctx = mixed if w.fc_weight is None else ctx.unsqueeze(-2) + mixed
    ctx = rms_norm(ctx, w.hidden_norm_weight, w.eps)
    keys, values = [], []
    for d in range(w.num_layers):
        ctx_d = ctx if w.fusion_probs is None else ctx[..., d, :]
        k = torch.nn.functional.linear(ctx_d, w.k_proj_weight[d], _bias(w.k_proj_bias, d))
        v = torch.nn.functional.linear(ctx_d, w.v_proj_weight[d], _bias(w.v_proj_bias, d))
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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"layer_mix_kv: {message}")


def _check_args(
    hidden: torch.Tensor,
    w: LayerMixWeights,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
) -> None:
    _check(hidden.dim() == 3, f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    _check(hidden.dtype in _HIDDEN_DTYPES, f"hidden must be float32/bf16/fp16, got {hidden.dtype}")
    _check(hidden.is_contiguous(), "hidden must be contiguous (call .contiguous() on it)")
    _check(
        w.fusion_probs is not None or w.fc_weight is not None,
        "set fusion_probs (DFlare), fc_weight (DFlash) or both (DFly) in LayerMixWeights",
    )
    _check(
        (w.k_proj_bias is None) == (w.v_proj_bias is None),
        "pass both projection biases or neither",
    )
    n, t, h = hidden.shape
    d, o = w.k_proj_weight.shape[:2]
    hd = w.head_dim
    _check(hd % 2 == 0 and o % hd == 0, f"head_dim {hd} must be even and divide KVH*hd={o}")
    dt, f32, i64 = hidden.dtype, torch.float32, torch.int64
    expected = {  # name: (tensor, shape, dtype)
        "fusion_probs": (w.fusion_probs, (d, t), f32),
        "fc_weight": (w.fc_weight, (h, t * h), dt),
        "hidden_norm_weight": (w.hidden_norm_weight, (h,), dt),
        "k_proj_weight": (w.k_proj_weight, (d, o, h), dt),
        "v_proj_weight": (w.v_proj_weight, (d, o, h), dt),
        "k_proj_bias": (w.k_proj_bias, (d, o), dt),
        "v_proj_bias": (w.v_proj_bias, (d, o), dt),
        "k_norm_weight": (w.k_norm_weight, (d, hd), dt),
        "cos_sin_cache": (w.cos_sin_cache, (w.cos_sin_cache.shape[0], hd), f32),
        "positions": (positions, (n,), i64),
        "slots": (slots, (n,), i64),
    }
    for name, (x, shape, dtype) in expected.items():
        if x is None:
            continue
        _check(tuple(x.shape) == shape, f"{name} must have shape {shape}, got {tuple(x.shape)}")
        _check(
            x.dtype == dtype,
            f"{name} must be {dtype}, got {x.dtype} (weights are in hidden's dtype, "
            "fusion_probs and cos_sin_cache in float32, positions and slots int64)",
        )
        _check(x.device == hidden.device, f"{name} is on {x.device}, hidden on {hidden.device}")
        if name in _PER_LAYER:  # views into fused per-layer tensors need no copy
            _check(
                len(x) == 0 or x[0].is_contiguous(),
                f"{name} must be dense within each layer (the stride between layers is free)",
            )
        else:
            _check(x.is_contiguous(), f"{name} must be contiguous (call .contiguous() once on it)")
    kvh, num_slots = o // hd, k_caches[0].shape[0] if k_caches else 0
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        _check(len(caches) == d, f"{name} has {len(caches)} tensors, expected one per layer ({d})")
        for c in caches:
            _check(
                tuple(c.shape) == (num_slots, kvh, hd),
                f"{name} tensors must all be [num_slots, {kvh}, {hd}], got {tuple(c.shape)}",
            )
            _check(
                c.dtype == k_caches[0].dtype and c.dtype in _CACHE_DTYPES,
                f"caches must share one dtype among {_CACHE_DTYPES}, got {c.dtype}",
            )
            _check(c.device == hidden.device, f"{name} is on {c.device}, hidden on {hidden.device}")
            _check(
                c.stride(2) == 1 and c.stride(1) == hd,
                f"each {name} row [{kvh}, {hd}] must be contiguous (stride over slots is free)",
            )
    # Index bounds are the caller's contract; checking them costs a host sync on a GPU, so
    # only CPU inputs are checked here (the CUDA kernel asserts on the device).
    if hidden.device.type == "cpu" and n > 0:
        _check(
            0 <= int(slots.min()) and int(slots.max()) < num_slots,
            f"slots must lie in [0, {num_slots}), got [{int(slots.min())}, {int(slots.max())}]",
        )
        max_pos = w.cos_sin_cache.shape[0]
        _check(
            0 <= int(positions.min()) and int(positions.max()) < max_pos,
            f"positions must lie in [0, {max_pos}) (cos_sin_cache rows); build a longer cache",
        )


def layer_mix_kv(
    hidden: torch.Tensor,
    weights: LayerMixWeights,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
) -> None:
    """Store every draft layer's context K/V for N new tokens into the paged caches.

    ``k_caches[d][slots[n]] = K_d[n]`` and ``v_caches[d][slots[n]] = V_d[n]``, with K_d, V_d
    as in :func:`context_kv`; other slots are left untouched. Runs the fused C++/CUDA kernel
    when the extension provides one for ``hidden``'s device, else :func:`layer_mix_kv_reference`.

    Args:
      hidden: ``[N, T, H]`` float32/bf16/fp16, contiguous: captured target hidden states.
      weights: the stacked draft weights, all in ``hidden``'s dtype except ``fusion_probs``
        and ``cos_sin_cache`` (float32); see :class:`LayerMixWeights`.
      positions: ``[N]`` int64 absolute positions (rows of ``weights.cos_sin_cache``).
      slots: ``[N]`` int64 cache slots, any order; duplicates are undefined.
      k_caches, v_caches: D tensors ``[num_slots, KVH, hd]`` (SGLang's per-layer layout) of one
        dtype among float32/bf16/fp16/float8_e4m3fn/float8_e5m2, written in place (cast on
        store). The slot stride is free, each ``[KVH, hd]`` row must be contiguous.
    """
    _check_args(hidden, weights, positions, slots, k_caches, v_caches)
    if not has_kernel("layer_mix_kv", hidden.device):
        layer_mix_kv_reference(hidden, weights, positions, slots, k_caches, v_caches)
        return
    w = weights
    torch.ops.dflare.layer_mix_kv(
        hidden,
        w.fusion_probs,
        w.fc_weight,
        w.hidden_norm_weight,
        w.k_proj_weight,
        w.v_proj_weight,
        w.k_proj_bias,
        w.v_proj_bias,
        w.k_norm_weight,
        w.eps,
        positions,
        w.cos_sin_cache,
        slots,
        k_caches,
        v_caches,
    )
