"""The block-diffusion draft model: DFlare (layer-wise fusion) and DFlash (shared fusion).

One draft forward turns a block ``[x_last, MASK x (B-1)]`` into B hidden states (the target's
``lm_head`` makes them tokens), conditioned on hidden states captured from T target layers.
Draft layer d attends, bidirectionally, over ``[context K/V of layer d, block K/V]``; the
context K/V come from :func:`dflare_sgl.layer_mix.context_kv` (the op's reference), the block
K/V from the layer's own ``k_proj / v_proj``. The context never enters the residual stream.

Checkpoints load without conversion from the two published formats (DESIGN.md section 2),
chosen by ``architectures`` in config.json:

* ``QwenDFlareDraftModel`` (AngelSlim DFlare): ``fusion="layerwise"``, per-layer softmax mix
  ``layer_fusion_weights [D, T]`` and per-layer ``k_proj_target / v_proj_target``.
* ``DFlashDraftModel`` (z-lab DFlash): ``fusion="shared"``, one ``fc [H, T*H]`` for all layers,
  whose context goes through every layer's ``k_proj / v_proj``.

Parameter names are the checkpoints' tensor names, so ``state_dict()`` is the file layout.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from dflare_sgl._files import make_readable
from dflare_sgl.layer_mix import LayerMixWeights, context_kv
from dflare_sgl.primitives import apply_rope, build_cos_sin_cache, rms_norm

ARCHITECTURES = {"QwenDFlareDraftModel": "layerwise", "DFlashDraftModel": "shared"}
FUSION_ARCHITECTURE = {fusion: arch for arch, fusion in ARCHITECTURES.items()}
_FORMAT_NAMES = {
    "layerwise": "DFlare layer-wise fusion (QwenDFlareDraftModel)",
    "shared": "DFlash shared fc fusion (DFlashDraftModel)",
}
# Reference settings that change what a draft computes outside the layers we implement (the
# embedding scale and logit post-processing of the DFlash reference): refused, not ignored.
_NEUTRAL_EXTRAS = {
    "input_embedding_scale": 1.0,
    "output_multiplier": 1.0,
    "final_logit_softcapping": None,
}


def default_target_layer_ids(num_target_layers: int, k: int) -> list[int]:
    """The k target layers a draft captures by default: ``round(1 + i*(L-4)/(k-1))``, i < k.

    Spread evenly from layer 1 to layer L-3, as both references do (k=1: ``[L // 2]``). For
    example Qwen3 with L=36: k=5 -> ``[1, 9, 17, 25, 33]``, k=9 -> ``[1, 5, ..., 33]``.
    """
    if num_target_layers < 1 or k < 1:
        raise ValueError(f"need L >= 1 target layers and k >= 1, got L={num_target_layers}, k={k}")
    if k == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (k - 1)) for i in range(k)]


def capture_target_hidden(
    hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]
) -> torch.Tensor:
    """Stack the captured layers of an HF ``output_hidden_states`` tuple: ``[b, s, T, H]``.

    ``hidden_states[0]`` is the embedding output, so target layer ``id`` is ``hidden_states[id+1]``.
    """
    return torch.stack([hidden_states[i + 1] for i in layer_ids], dim=-2)


def _standard_rope(settings: dict[str, Any]) -> dict[str, Any]:
    """HF-standardised ``rope_parameters`` from any of the config spellings (``rope_theta``,
    ``rope_scaling`` of transformers 4, ``rope_parameters`` of transformers 5)."""
    keys = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")
    hf = Qwen3Config(**copy.deepcopy({k: settings[k] for k in keys if settings.get(k) is not None}))
    return dict(hf.rope_parameters)


@dataclass
class DraftConfig:
    """Shape and format of a draft. D = ``num_hidden_layers``, T = ``len(target_layer_ids)``.

    ``num_target_layers`` is the TARGET's layer count L (None when a checkpoint does not say);
    ``target_layer_ids`` index target layers (hidden state ``id + 1``). ``draft_vocab_size``
    N, when set, says the draft proposes only N of the target's tokens (the ``draft_vocab_ids``
    its weights carry; see :meth:`DFlareDraftModel.set_draft_vocab`); None = every token.
    ``raw`` is the config.json dict it came from, so keys this class does not model survive a
    save.
    """

    fusion: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    target_layer_ids: list[int]
    num_target_layers: int | None
    mask_token_id: int | None
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1_000_000.0}
    )
    initializer_range: float = 0.02
    draft_vocab_size: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_ARCHITECTURE:
            raise ValueError(
                f"fusion must be 'layerwise' (DFlare) or 'shared' (DFlash), got {self.fusion!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported: draft MLPs are SwiGLU, set "
                "hidden_act to 'silu'"
            )
        if self.num_hidden_layers < 1 or not self.target_layer_ids:
            raise ValueError("a draft needs at least one layer and one target layer id")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.draft_vocab_size == self.vocab_size:
            self.draft_vocab_size = None  # EAGLE-3 configs write the full size for "all tokens"
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size < self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} must be in [1, vocab_size "
                f"{self.vocab_size}]: remove it to let the draft propose every token"
            )

    @property
    def num_captured_layers(self) -> int:
        return len(self.target_layer_ids)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DraftConfig:
        """Read a config.json dict of either published format (detected from ``architectures``)."""
        archs = config.get("architectures") or []
        found = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if len(found) != 1:
            raise ValueError(
                f"unsupported draft architectures {archs}: expected ['QwenDFlareDraftModel'] "
                "(DFlare, layer-wise fusion) or ['DFlashDraftModel'] (DFlash, shared fusion)"
            )
        hf = Qwen3Config(**copy.deepcopy(config))
        if any(t != "full_attention" for t in hf.layer_types) or config.get("is_causal"):
            raise ValueError(
                "causal or sliding-window draft layers are not supported: DFlare/DFlash drafts "
                "attend bidirectionally; set use_sliding_window=false and drop is_causal"
            )
        dflash = config.get("dflash_config") or {}

        def draft_value(name: str, default: Any = None) -> Any:
            # dflash_config first, then the top level (the lookup order of the references).
            return dflash.get(name, config.get(name, default))

        for name, neutral in _NEUTRAL_EXTRAS.items():
            if draft_value(name, neutral) != neutral:
                raise ValueError(
                    f"{name}={draft_value(name)} is not supported (only {neutral!r}): this "
                    "package runs DFlashDraftModel / QwenDFlareDraftModel drafts without it"
                )
        num_target_layers = config.get("num_target_layers")
        ids = draft_value("target_layer_ids")
        if ids is None:
            if num_target_layers is None:
                raise ValueError(
                    "config.json gives neither dflash_config.target_layer_ids nor "
                    "num_target_layers: add one so the captured target layers are known"
                )
            ids = default_target_layer_ids(num_target_layers, hf.num_hidden_layers)
        return cls(
            fusion=found[0],
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads,
            head_dim=hf.head_dim,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            target_layer_ids=list(ids),
            num_target_layers=num_target_layers,
            mask_token_id=draft_value("mask_token_id"),
            block_size=int(draft_value("block_size", 16)),
            rms_norm_eps=hf.rms_norm_eps,
            attention_bias=hf.attention_bias,
            hidden_act=hf.hidden_act,
            rope_parameters=dict(hf.rope_parameters),
            initializer_range=hf.initializer_range,
            draft_vocab_size=config.get("draft_vocab_size"),
            raw=copy.deepcopy(config),
        )

    def to_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The config.json dict of this draft's format; ``dtype`` records the saved weights'."""
        out = copy.deepcopy(self.raw)
        default_rope = self.rope_parameters.get("rope_type", "default") == "default"
        out.update(
            architectures=[FUSION_ARCHITECTURE[self.fusion]],
            model_type="qwen3",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            attention_bias=self.attention_bias,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            block_size=self.block_size,
            layer_types=["full_attention"] * self.num_hidden_layers,
            use_sliding_window=False,
            # Both spellings, so transformers 4 (rope_theta / rope_scaling) and 5 read it.
            rope_parameters=copy.deepcopy(self.rope_parameters),
            rope_theta=self.rope_parameters["rope_theta"],
            rope_scaling=None if default_rope else copy.deepcopy(self.rope_parameters),
        )
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        out.pop("draft_vocab_size", None)
        if self.draft_vocab_size is not None:
            out["draft_vocab_size"] = self.draft_vocab_size
        dflash = dict(out.get("dflash_config") or {})
        dflash.update(
            mask_token_id=self.mask_token_id, target_layer_ids=list(self.target_layer_ids)
        )
        if "block_size" in dflash:
            dflash["block_size"] = self.block_size
        out["dflash_config"] = dflash
        if dtype is not None:
            out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
        return out

    @classmethod
    def for_target(
        cls,
        target_config: Any,
        num_draft_layers: int,
        fusion: str = "layerwise",
        block_size: int = 16,
        mask_token_id: int | None = None,
        num_captured_layers: int | None = None,
        intermediate_size: int | None = None,
    ) -> DraftConfig:
        """A fresh draft config sized for an HF target config (hidden size, heads, head_dim,
        RoPE, eps and vocab copied from the target).

        ``num_captured_layers`` (T) defaults to ``num_draft_layers`` (the references' choice),
        captured at :func:`default_target_layer_ids`. ``mask_token_id`` must be an id inside
        the target vocab (SGLang cannot grow the embedding); None picks ``vocab_size - 1``,
        usually an unused or reserved id. Any id works as long as training and inference use
        the same one, since the MASK embedding is only ever read, never trained.
        """
        t = (
            target_config.get_text_config()
            if hasattr(target_config, "get_text_config")
            else target_config
        )
        vocab = t.vocab_size
        mask = vocab - 1 if mask_token_id is None else int(mask_token_id)
        if not 0 <= mask < vocab:
            raise ValueError(f"mask_token_id {mask} is outside the target vocab [0, {vocab})")
        heads = t.num_attention_heads
        L = t.num_hidden_layers
        return cls(
            fusion=fusion,
            hidden_size=t.hidden_size,
            intermediate_size=intermediate_size or t.intermediate_size,
            num_hidden_layers=num_draft_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(t, "num_key_value_heads", None) or heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
            vocab_size=vocab,
            max_position_embeddings=t.max_position_embeddings,
            target_layer_ids=default_target_layer_ids(L, num_captured_layers or num_draft_layers),
            num_target_layers=L,
            mask_token_id=mask,
            block_size=block_size,
            rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6),
            attention_bias=bool(getattr(t, "attention_bias", False)),
            hidden_act=getattr(t, "hidden_act", "silu"),
            rope_parameters=_standard_rope(t.to_dict()),
            initializer_range=getattr(t, "initializer_range", 0.02),
        )

    def rope_cache(self) -> torch.Tensor:
        """The RoPE table ``[max_position_embeddings, head_dim]`` float32 on the CPU, with the
        inverse frequencies and attention scaling HF computes for these rope settings."""
        hf = Qwen3Config(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=copy.deepcopy(self.rope_parameters),
        )
        rope_type = hf.rope_parameters["rope_type"]
        if rope_type == "default":
            init = Qwen3RotaryEmbedding.compute_default_rope_parameters
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "longrope":
            init = ROPE_INIT_FUNCTIONS[rope_type]
        else:
            # longrope switches frequencies with the sequence length: no static table exists.
            raise ValueError(f"rope_type {rope_type!r} is not supported by the draft model")
        # The tables are built on the CPU even under a caller's `torch.device("meta")` context.
        with torch.device("cpu"):
            inv_freq, scaling = init(hf)
            if 2 * inv_freq.numel() != self.head_dim:
                raise ValueError(
                    "partial rotary embeddings are not supported: rotate the whole head"
                )
            return build_cos_sin_cache(inv_freq, self.max_position_embeddings, scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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


class DFlareDraftModel(nn.Module):
    """A DFlare (``fusion="layerwise"``) or DFlash (``fusion="shared"``) draft.

    It has no embedding or output head: callers embed the block with the target's
    ``embed_tokens`` and read tokens with its ``lm_head`` (restricted to ``draft_vocab_ids``
    when the draft has them). New weights are initialised as the references do, from
    ``generator`` (or torch's global RNG when None).
    """

    def __init__(self, config: DraftConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        h, d, t = config.hidden_size, config.num_hidden_layers, config.num_captured_layers
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(d))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        if config.fusion == "layerwise":
            self.layer_fusion_weights = nn.Parameter(torch.empty(d, t))
        else:
            self.fc = nn.Linear(t * h, h, bias=False)
        # A plain attribute, not a buffer, so that `.to(torch.bfloat16)` keeps it float32.
        self._cos_sin_cache = config.rope_cache()
        n = config.draft_vocab_size
        # A persistent buffer, so it is saved and loaded with the weights (int64: `.to(dtype)`
        # leaves it alone); None (the published formats) is left out of the state dict.
        self.register_buffer("draft_vocab_ids", None if n is None else torch.zeros(n).long())
        self.reset_parameters(generator)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh weights: linears ~ N(0, initializer_range), biases 0, norms 1, and each draft
        layer d's fusion row peaked (logit 2.0) at target layer ``floor(d * T / D)``."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name != "layer_fusion_weights":
                p.normal_(0.0, self.config.initializer_range, generator=generator)
        if self.config.fusion == "layerwise":
            d, t = self.layer_fusion_weights.shape
            self.layer_fusion_weights.zero_()
            self.layer_fusion_weights[torch.arange(d), torch.arange(d) * t // d] = 2.0

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Let the draft propose only ``token_ids`` (int ``[N]``, distinct target token ids),
        or every token (None).

        Why: on CPU the draft's token head, a ``[B-1, H] x [H, V]`` product over the target's
        whole vocabulary, is a fixed cost of every step; the tokens a target actually writes are
        a few thousand (EAGLE-3's reduced draft vocabulary). Outputs stay the target's: a token
        the draft cannot propose is only never accepted, it is still committed as the target's
        own correction. Saved as ``draft_vocab_ids`` with ``draft_vocab_size`` in config.json.
        """
        if token_ids is not None:
            token_ids = _checked_draft_vocab(token_ids, self.config.vocab_size)
            if token_ids.numel() == self.config.vocab_size:
                token_ids = None  # every token: the published formats' layout
        self.draft_vocab_ids = None if token_ids is None else token_ids.to(self.norm.weight.device)
        self.config.draft_vocab_size = None if token_ids is None else token_ids.numel()

    def _rope(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin_cache.device != device:
            self._cos_sin_cache = self._cos_sin_cache.to(device)
        return self._cos_sin_cache

    def layer_mix_weights(self) -> LayerMixWeights:
        """The stacked weights the context K/V op reads (differentiable: training uses them).

        DFlare: softmax(``layer_fusion_weights``) in float32 and every layer's
        ``k_proj_target / v_proj_target``; DFlash: ``fc`` and every layer's ``k_proj / v_proj``.
        """
        attn = [layer.self_attn for layer in self.layers]
        layerwise = self.config.fusion == "layerwise"
        k_projs = [a.k_proj_target if layerwise else a.k_proj for a in attn]
        v_projs = [a.v_proj_target if layerwise else a.v_proj for a in attn]
        bias = self.config.attention_bias
        return LayerMixWeights(
            fusion_probs=self.layer_fusion_weights.float().softmax(-1) if layerwise else None,
            fc_weight=None if layerwise else self.fc.weight,
            hidden_norm_weight=self.hidden_norm.weight,
            k_proj_weight=torch.stack([m.weight for m in k_projs]),
            v_proj_weight=torch.stack([m.weight for m in v_projs]),
            k_proj_bias=torch.stack([m.bias for m in k_projs]) if bias else None,
            v_proj_bias=torch.stack([m.bias for m in v_projs]) if bias else None,
            k_norm_weight=torch.stack([a.k_norm.weight for a in attn]),
            eps=self.config.rms_norm_eps,
            cos_sin_cache=self._rope(self.norm.weight.device),
        )

    def _run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        context: ContextFn,
        mask: torch.Tensor | None,
        cache: Any = None,
    ) -> torch.Tensor:
        cos_sin = self._rope(hidden.device)
        for d, layer in enumerate(self.layers):
            ctx_k, ctx_v = context(d)
            attn_in = layer.input_layernorm(hidden)
            hidden = hidden + layer.self_attn(
                attn_in, positions, cos_sin, ctx_k, ctx_v, mask, cache, d
            )
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)

    def forward(
        self,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_embedding: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Draft hidden states ``[b, q, H]`` (the references' training / HF-cache contract).

        Args:
          position_ids: ``[b or 1, ctx + q]`` int64 absolute positions of context then block.
          attention_mask: bool or additive mask broadcastable to ``[b, heads, q, keys]`` as
            SDPA takes it (keys = cached + ctx + q), or a flex_attention ``BlockMask`` (the
            CUDA training mask); None lets every query see every key.
          noise_embedding: ``[b, q, H]`` target embeddings of the block tokens.
          target_hidden: ``[b, ctx, T*H]`` captured target layers concatenated on the last
            dim (``[b, ctx, T, H]`` from :func:`capture_target_hidden` is accepted too).
          past_key_values: an HF ``Cache``; as in the references, every layer's new context
            and block K/V are appended to it (whatever ``use_cache``, kept for their signature)
            and attention runs over all cached keys. Crop it afterwards to drop the block.
        """
        if noise_embedding is None or target_hidden is None:
            raise ValueError("forward needs both noise_embedding and target_hidden")
        t, h = self.config.num_captured_layers, self.config.hidden_size
        if target_hidden.dim() == 3:
            if target_hidden.shape[-1] != t * h:
                raise ValueError(
                    f"target_hidden has {target_hidden.shape[-1]} features; this draft captures "
                    f"T={t} target layers of H={h}, i.e. T*H={t * h}"
                )
            target_hidden = target_hidden.unflatten(-1, (t, h))
        ctx, q = target_hidden.shape[1], noise_embedding.shape[1]
        if position_ids.shape[-1] != ctx + q:
            raise ValueError(
                f"position_ids cover {position_ids.shape[-1]} tokens, expected ctx + q = {ctx + q}"
            )
        keys, values = context_kv(target_hidden, self.layer_mix_weights(), position_ids[:, :ctx])
        return self._run_layers(
            noise_embedding,
            position_ids[:, ctx:],
            lambda d: (keys[d], values[d]),
            attention_mask,
            past_key_values,
        )

    def draft_block(
        self,
        noise_embedding: torch.Tensor,
        positions: torch.Tensor,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        ctx_slots: torch.Tensor,
        ctx_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Cached inference: draft hidden states ``[bs, q, H]`` of a batch of blocks.

        Args:
          noise_embedding: ``[bs, q, H]`` target embeddings of ``[x_last, MASK...]``.
          positions: ``[bs, q]`` int64 absolute positions of the block tokens.
          k_caches, v_caches: D tensors ``[num_slots, KVH, hd]`` holding context K (RoPE
            applied) / V, written by ``layer_mix_kv``.
          ctx_slots: ``[bs, C]`` int64 cache rows of each request's context in order; entries
            at or past ``ctx_lens[i]`` are masked out but must still be valid row indices.
          ctx_lens: ``[bs]`` int64 number of context tokens of each request.
        """
        bs, q, _ = noise_embedding.shape
        c = ctx_slots.shape[1]
        visible = torch.arange(c, device=ctx_slots.device)[None, :] < ctx_lens[:, None]
        mask = torch.cat([visible, visible.new_ones(bs, q)], dim=1)[:, None, None, :]
        return self._run_layers(
            noise_embedding,
            positions,
            lambda d: (k_caches[d][ctx_slots], v_caches[d][ctx_slots]),
            mask,
        )

    def check_compatible(self, target_config: Any) -> None:
        """Refuse, with the reason, a target this draft cannot run with."""
        t = (
            target_config.get_text_config()
            if hasattr(target_config, "get_text_config")
            else target_config
        )
        cfg, fix = self.config, "use a draft trained for this target"
        if cfg.hidden_size != t.hidden_size:
            raise ValueError(
                f"draft hidden_size {cfg.hidden_size} != target hidden_size {t.hidden_size}: {fix}"
            )
        num_layers = t.num_hidden_layers
        if cfg.num_target_layers is not None and cfg.num_target_layers != num_layers:
            raise ValueError(
                f"draft was trained on a {cfg.num_target_layers}-layer target, this target has "
                f"{num_layers} layers: {fix}"
            )
        bad = [i for i in cfg.target_layer_ids if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"target_layer_ids {bad} are outside the target's layers [0, {num_layers}): {fix}"
            )
        if cfg.mask_token_id is None or not 0 <= cfg.mask_token_id < t.vocab_size:
            raise ValueError(
                f"mask_token_id {cfg.mask_token_id} is not inside the target vocab "
                f"[0, {t.vocab_size}): set dflash_config.mask_token_id to an id of this vocab"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DFlareDraftModel:
        """Load a DFlare or DFlash checkpoint directory (config.json + safetensors weights).

        ``dtype`` None keeps the dtype config.json records (else the stored tensors').
        Every checkpoint tensor must match a parameter by name and shape.
        """
        path = Path(path)
        raw = _read_json(path / "config.json")
        config = DraftConfig.from_dict(raw)
        state = _read_weights(path)
        with torch.device("meta"):  # no init work: every parameter is replaced below
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        wrong = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
            for k in sorted(expected.keys() & state.keys())
            if state[k].shape != expected[k]
        ]
        if missing or unexpected or wrong:
            problems = [
                f"{what}: {_preview(keys)}"
                for what, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", wrong),
                )
                if keys
            ]
            raise ValueError(
                f"weights in {path} do not fit the {_FORMAT_NAMES[config.fusion]} format its "
                f"config.json declares ({'; '.join(problems)}); check that config.json belongs to "
                "these weights"
            )
        model.load_state_dict(state, assign=True)
        if model.draft_vocab_ids is not None:
            try:
                _checked_draft_vocab(model.draft_vocab_ids, config.vocab_size)
            except ValueError as e:
                raise ValueError(f"draft_vocab_ids in {path}: {e}") from None
        if dtype is None:
            named = raw.get("dtype") or raw.get("torch_dtype")
            dtype = (
                getattr(torch, named)
                if isinstance(named, str)
                else next(iter(state.values())).dtype
            )
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors in this draft's published format."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict(dtype=self.norm.weight.dtype)
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        make_readable(path / "config.json", path / "model.safetensors")


def _checked_draft_vocab(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``token_ids`` as int64, refused unless 1-D, distinct and inside ``[0, vocab_size)``."""
    if token_ids.dim() != 1 or token_ids.numel() == 0 or token_ids.is_floating_point():
        raise ValueError(
            f"a draft vocabulary is a non-empty 1-D tensor of token ids, got "
            f"{token_ids.dtype} {tuple(token_ids.shape)}"
        )
    ids = token_ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
    if ids.unique().numel() != ids.numel():
        raise ValueError("draft vocabulary ids must be distinct")
    return ids


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{file} not found: a draft checkpoint directory needs config.json"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [path / f for f in sorted(set(_read_json(index).get("weight_map", {}).values()))]
    else:
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json: draft "
            "weights must be stored as safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"cannot read draft weights {file} ({e}): the file is missing, truncated or not "
                "safetensors; download or save the checkpoint again"
            ) from e
    return state
