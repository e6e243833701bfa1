"""The draft's layers: attention over ``[context K/V, block K/V]`` and a SwiGLU MLP.

Module and parameter names are the checkpoints' tensor names (DFlash, DFlare and DFly share
the layer layout), so a state dict is the file layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dflare_sgl.draft_config import DraftConfig
from dflare_sgl.hidden_correction import RMSNorm
from dflare_sgl.primitives import apply_rope


# flex_attention is only efficient compiled; torch.compile is lazy, so this costs nothing
# until a BlockMask is passed. Default dynamism: after the first sequence-length change it
# compiles one kernel for all lengths instead of one per batch shape.
_compiled_flex_attention = torch.compile(flex_attention)

# (layer index) -> this layer's context (K [b, C, KVH, hd] with RoPE, V [b, C, KVH, hd]).
ContextFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class DraftAttention(nn.Module):
    """Block queries over ``[context K/V, block K/V]``; no causal mask inside the block."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        h, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        kv = config.num_key_value_heads * hd
        self.head_dim = hd
        self.q_proj = nn.Linear(h, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, kv, bias=bias)
        self.v_proj = nn.Linear(h, kv, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, h, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        if config.fusion == "layerwise":
            # Read only through DFlareDraftModel.layer_mix_weights (the context K/V op).
            self.k_proj_target = nn.Linear(h, kv, bias=bias)
            self.v_proj_target = nn.Linear(h, kv, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Any,
        layer_idx: int,
    ) -> torch.Tensor:
        hd = self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).unflatten(-1, (-1, hd))), positions, cos_sin)
        k = apply_rope(self.k_norm(self.k_proj(x).unflatten(-1, (-1, hd))), positions, cos_sin)
        v = self.v_proj(x).unflatten(-1, (-1, hd))
        k = torch.cat([ctx_k.to(k.dtype), k], dim=1).transpose(1, 2)  # [b, KVH, C+q, hd]
        v = torch.cat([ctx_v.to(v.dtype), v], dim=1).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if isinstance(mask, BlockMask):  # training on CUDA: training.blocks.block_attention_mask
            out = _compiled_flex_attention(
                q.transpose(1, 2), k, v, block_mask=mask, scale=hd**-0.5, enable_gqa=True
            )
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, scale=hd**-0.5, enable_gqa=True
            )
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DraftMLP(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

