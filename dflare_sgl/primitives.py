"""Numerical building blocks shared by the draft model and the op references.

Each follows the HF Qwen3 modules' order of operations exactly (the reference draft
implementations are built on them), so that outputs agree to float32 rounding.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and cast back (as Qwen3RMSNorm)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0
) -> torch.Tensor:
    """RoPE table ``[max_positions, head_dim]`` float32: ``cat(cos, sin)`` of the half dims.

    The same layout as SGLang's ``RotaryEmbedding.cos_sin_cache`` (neox style, the whole
    head rotated), so the table can be handed to the CUDA op and to SGLang alike.
    """
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.to(torch.float32)[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x [..., S, heads, head_dim]`` at ``positions [..., S]`` (neox rotate-half).

    cos/sin are cast to ``x.dtype`` before use, as HF's rotary embedding does.
    """
    cos, sin = cos_sin_cache[positions].to(x.dtype).chunk(2, dim=-1)  # [..., S, hd/2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
