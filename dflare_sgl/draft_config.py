"""Draft configuration: the three published checkpoint families and their config.json.

The family is read from ``architectures`` (DESIGN.md section 2) and kept as ``fusion``, the way
the draft turns the T captured target layers into each draft layer's context:

==================  ==========  ================================================================
architectures       fusion      context of draft layer d (hs_t: captured target layer t)
==================  ==========  ================================================================
QwenDFlareDraftModel layerwise  ``norm(sum_t softmax(W)[d, t] hs_t)``, own ``k/v_proj_target``
DFlashDraftModel    shared      ``norm(fc(concat_t hs_t))`` for every layer, layer's ``k/v_proj``
Qwen3DFlyModel      dfly        ``norm(fc(concat_t hs_t) + sum_t softmax(W)[d, t] hs_t)``, layer's
                                ``k/v_proj``; plus a hidden-state correction head (DFly)
==================  ==========  ================================================================

DFly (AngelSpec's "DFlareV2") also differs in where config.json keeps things: ``target_layer_ids``
and ``mask_token_id`` at the top level, ``num_target_layers`` counting the CAPTURED layers (T)
and ``target_num_hidden_layers`` the target's depth (L), no ``block_size``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from dflare_sgl.primitives import build_cos_sin_cache

ARCHITECTURES = {
    "QwenDFlareDraftModel": "layerwise",
    "DFlashDraftModel": "shared",
    "Qwen3DFlyModel": "dfly",
}
FUSION_ARCHITECTURE = {fusion: arch for arch, fusion in ARCHITECTURES.items()}
FORMAT_NAMES = {
    "layerwise": "DFlare layer-wise fusion (QwenDFlareDraftModel)",
    "shared": "DFlash shared fc fusion (DFlashDraftModel)",
    "dfly": "DFly shared fc + layer-wise residual fusion (Qwen3DFlyModel)",
}
# The block a DFly config does not record: AngelSlim's published DFly drafts ("-B8") verify 8
# tokens per step (the anchor and 7 drafts), as AngelSpec's inference settings for them do.
DFLY_DEFAULT_BLOCK_SIZE = 8
# Reference settings that change what a draft computes outside the layers we implement (the
# embedding scale and logit post-processing of the DFlash reference): refused, not ignored.
_NEUTRAL_EXTRAS = {
    "input_embedding_scale": 1.0,
    "output_multiplier": 1.0,
    "final_logit_softcapping": None,
    # SGLang's DFlash layers read these; layer_mix_kv and the reference layers implement
    # Qwen3's rotate-half RoPE and RMSNorm only.
    "rope_is_neox_style": True,
    "is_neox_style": True,
    "use_gemma_norm": False,
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
    ``hidden_correction`` (DFly) adds the correction head, a SwiGLU of width
    ``hidden_correction_intermediate_size`` (None = H) over ``[hidden; previous token]``.
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
    hidden_correction: bool = False
    hidden_correction_intermediate_size: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_ARCHITECTURE:
            raise ValueError(
                f"fusion must be 'layerwise' (DFlare), 'shared' (DFlash) or 'dfly' (DFly), got "
                f"{self.fusion!r}"
            )
        if self.hidden_correction and self.fusion != "dfly":
            raise ValueError("the hidden-state correction head exists only in DFly drafts")
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
                "(DFlare, layer-wise fusion), ['DFlashDraftModel'] (DFlash, shared fusion) or "
                "['Qwen3DFlyModel'] (DFly)"
            )
        fusion = found[0]
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
                    "package's draft layers and kernels implement DFlash, DFlare and DFly "
                    "drafts without it"
                )
        ids = draft_value("target_layer_ids")
        if fusion == "dfly":
            num_target_layers, num_captured = _dfly_layer_counts(config, ids, hf.hidden_size)
        else:
            num_target_layers, num_captured = config.get("num_target_layers"), hf.num_hidden_layers
        if ids is None:
            if num_target_layers is None:
                raise ValueError(
                    "config.json gives neither target_layer_ids nor the target's layer count "
                    "(num_target_layers; target_num_hidden_layers for DFly): add one so the "
                    "captured target layers are known"
                )
            ids = default_target_layer_ids(num_target_layers, num_captured)
        default_block = DFLY_DEFAULT_BLOCK_SIZE if fusion == "dfly" else 16
        correction = fusion == "dfly" and bool(config.get("enable_hidden_correction", True))
        if correction and config.get("hidden_correction_type", "swiglu") != "swiglu":
            raise ValueError(
                f"hidden_correction_type={config['hidden_correction_type']!r} is not supported: "
                "DFly drafts use the SwiGLU correction head ('swiglu')"
            )
        return cls(
            fusion=fusion,
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
            block_size=int(draft_value("block_size", default_block)),
            rms_norm_eps=hf.rms_norm_eps,
            attention_bias=hf.attention_bias,
            hidden_act=hf.hidden_act,
            rope_parameters=dict(hf.rope_parameters),
            initializer_range=hf.initializer_range,
            draft_vocab_size=config.get("draft_vocab_size"),
            hidden_correction=correction,
            hidden_correction_intermediate_size=config.get("hidden_correction_intermediate_size"),
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
        out.pop("draft_vocab_size", None)
        if self.draft_vocab_size is not None:
            out["draft_vocab_size"] = self.draft_vocab_size
        if dtype is not None:
            out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
        if self.fusion == "dfly":
            # DFly's own layout: ids at the top level, T and L under DFly's names.
            out.update(
                target_layer_ids=list(self.target_layer_ids),
                mask_token_id=self.mask_token_id,
                num_target_layers=self.num_captured_layers,
                target_hidden_size=self.hidden_size,
                enable_hidden_correction=self.hidden_correction,
                hidden_correction_intermediate_size=self.hidden_correction_intermediate_size,
            )
            out.pop("target_num_hidden_layers", None)
            if self.num_target_layers is not None:
                out["target_num_hidden_layers"] = self.num_target_layers
            return out
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        dflash = dict(out.get("dflash_config") or {})
        dflash.update(
            mask_token_id=self.mask_token_id, target_layer_ids=list(self.target_layer_ids)
        )
        if "block_size" in dflash:
            dflash["block_size"] = self.block_size
        out["dflash_config"] = dflash
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
        ``fusion="dfly"`` includes DFly's correction head.
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
            hidden_correction=fusion == "dfly",
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


def _dfly_layer_counts(
    config: dict[str, Any], ids: list[int] | None, hidden_size: int
) -> tuple[int | None, int]:
    """(target depth L, captured layers T) of a DFly config.json, refusing inconsistent ones.

    DFly's ``num_target_layers`` is T (DFlare's is L): read as L, a valid target would be
    refused as too shallow."""
    captured = config.get("num_target_layers")
    if ids is not None and captured is not None and int(captured) != len(ids):
        raise ValueError(
            f"DFly config.json: num_target_layers {captured} (the captured layers) != "
            f"len(target_layer_ids) {len(ids)}: make them agree"
        )
    if ids is None and captured is None:
        raise ValueError("DFly config.json needs target_layer_ids or num_target_layers")
    target_hidden = config.get("target_hidden_size", hidden_size)
    if target_hidden != hidden_size:
        raise ValueError(
            f"DFly adds target hidden states to the draft's: target_hidden_size {target_hidden} "
            f"must equal hidden_size {hidden_size}"
        )
    depth = config.get("target_num_hidden_layers")
    return (None if depth is None else int(depth)), len(ids) if ids is not None else int(captured)
