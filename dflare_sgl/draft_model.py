"""The block-diffusion draft model: DFlare, DFlash and DFly (DESIGN.md section 2).

One draft forward turns a block ``[x_last, MASK x (B-1)]`` into B hidden states (the target's
``lm_head`` makes them tokens), conditioned on hidden states captured from T target layers.
Draft layer d attends, bidirectionally, over ``[context K/V of layer d, block K/V]``; the
context K/V come from :func:`dflare_sgl.layer_mix.context_kv` (the op's reference), the block
K/V from the layer's own ``k_proj / v_proj``. The context never enters the residual stream.

The three families differ only in how the captured layers become each layer's context (the
table in :mod:`dflare_sgl.draft_config`) and in DFly's correction head
(:class:`~dflare_sgl.draft_layers.HiddenCorrection`). Checkpoints load without conversion
(:mod:`dflare_sgl.draft_checkpoint`), the family read from config.json's ``architectures``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dflare_sgl.draft_checkpoint import (
    EMBEDDING,
    check_exported_embedding,
    checked_draft_vocab,
    check_state,
    from_file_names,
    read_json,
    read_weights,
    saved_dtype,
    to_file_names,
    write_checkpoint,
)
from dflare_sgl.draft_config import (
    ARCHITECTURES,
    FORMAT_NAMES,
    FUSION_ARCHITECTURE,
    DraftConfig,
    default_target_layer_ids,
)
from dflare_sgl.draft_layers import ContextFn, DraftLayer
from dflare_sgl.hidden_correction import HiddenCorrection, RMSNorm
from dflare_sgl.layer_mix import LayerMixWeights, context_kv

__all__ = [
    "ARCHITECTURES",
    "FUSION_ARCHITECTURE",
    "DFlareDraftModel",
    "DraftConfig",
    "capture_target_hidden",
    "default_target_layer_ids",
]


def capture_target_hidden(
    hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]
) -> torch.Tensor:
    """Stack the captured layers of an HF ``output_hidden_states`` tuple: ``[b, s, T, H]``.

    ``hidden_states[0]`` is the embedding output, so target layer ``id`` is ``hidden_states[id+1]``.
    """
    return torch.stack([hidden_states[i + 1] for i in layer_ids], dim=-2)


class DFlareDraftModel(nn.Module):
    """A DFlare (``fusion="layerwise"``), DFlash (``"shared"``) or DFly (``"dfly"``) draft.

    It has no embedding or output head: callers embed the block with the target's
    ``embed_tokens`` and read tokens with its ``lm_head`` (restricted to ``draft_vocab_ids``
    when the draft has them). A DFly draft's ``hidden_correction`` head (None otherwise)
    corrects each block slot's hidden state by the token before it, before the ``lm_head``
    (:meth:`draft_tokens` at inference, ``prev_embedding`` in training). New weights are
    initialised as the references do, from ``generator`` (or torch's global RNG when None).
    """

    def __init__(self, config: DraftConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        h, d, t = config.hidden_size, config.num_hidden_layers, config.num_captured_layers
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(d))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        if config.fusion in ("layerwise", "dfly"):
            self.layer_fusion_weights = nn.Parameter(torch.empty(d, t))
        if config.fusion in ("shared", "dfly"):
            self.fc = nn.Linear(t * h, h, bias=False)
        self.hidden_correction = (
            HiddenCorrection(h, config.hidden_correction_intermediate_size, config.rms_norm_eps)
            if config.hidden_correction
            else None
        )
        # DFly's frozen copy of the target embedding, when its checkpoint carries one: only
        # compared with the target's (check_target_embedding), then dropped.
        self.exported_embedding: torch.Tensor | None = None
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
        """Fresh weights: linears ~ N(0, initializer_range), biases 0, norms 1, each draft
        layer d's fusion row peaked (logit 2.0) at target layer ``floor(d * T / D)``, and the
        correction head's ``down_proj`` 0 (it starts as no correction, as DFly's does)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name != "layer_fusion_weights":
                p.normal_(0.0, self.config.initializer_range, generator=generator)
        if self.hidden_correction is not None:
            self.hidden_correction.down_proj.weight.zero_()
        if self.config.fusion != "shared":
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
            token_ids = checked_draft_vocab(token_ids, self.config.vocab_size)
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
        ``k_proj_target / v_proj_target``; DFlash: ``fc`` and every layer's ``k_proj / v_proj``;
        DFly: both mixes and every layer's ``k_proj / v_proj``.
        """
        attn = [layer.self_attn for layer in self.layers]
        layerwise = self.config.fusion == "layerwise"
        k_projs = [a.k_proj_target if layerwise else a.k_proj for a in attn]
        v_projs = [a.v_proj_target if layerwise else a.v_proj for a in attn]
        bias = self.config.attention_bias
        return LayerMixWeights(
            fusion_probs=(
                self.layer_fusion_weights.float().softmax(-1)
                if self.config.fusion != "shared"
                else None
            ),
            fc_weight=self.fc.weight if self.config.fusion != "layerwise" else None,
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
        prev_embedding: torch.Tensor | None = None,
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
          prev_embedding: ``[b, q, H]`` DFly only: the target embedding of the token before each
            block slot; given, the states come out corrected by the correction head (teacher
            forcing, as DFly trains it; inside forward so FSDP gathers its weights too).
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
        hidden = self._run_layers(
            noise_embedding,
            position_ids[:, ctx:],
            lambda d: (keys[d], values[d]),
            attention_mask,
            past_key_values,
        )
        if prev_embedding is None:
            return hidden
        if self.hidden_correction is None:
            raise ValueError("prev_embedding is for DFly drafts: this draft has no correction head")
        return self.hidden_correction(hidden, prev_embedding)

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

    def draft_tokens(
        self,
        hidden: torch.Tensor,
        anchor_ids: torch.Tensor,
        embed: Callable[[torch.Tensor], torch.Tensor],
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The drafted tokens ``[bs, q-1]`` of block slots 1..q-1 from the draft's states.

        Args:
          hidden: ``[bs, q, H]`` from :meth:`draft_block` (slot 0 is the anchor's).
          anchor_ids: ``[bs]`` int64 the block's first token (the last committed one).
          embed: token ids ``[bs]`` -> target embeddings ``[bs, H]``.
          pick: states ``[..., H]`` -> token ids ``[...]`` (the head and its argmax).
        Without a correction head every slot is picked at once; DFly's slot i is corrected
        by the token picked at slot i-1 (the anchor for slot 1), one slot after another.
        """
        if self.hidden_correction is None:
            return pick(hidden[:, 1:])
        return self.hidden_correction.draft(hidden, anchor_ids, embed, pick)[1]

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

    def check_target_embedding(self, weight: torch.Tensor) -> None:
        """Refuse a target whose input embedding is not the one a DFly checkpoint exported.

        The published DFly drafts carry a frozen copy of their target's ``embed_tokens``; the
        draft then runs on the target's own (identical) embedding, so the copy is dropped here.
        """
        copy, self.exported_embedding = self.exported_embedding, None
        if copy is not None:
            check_exported_embedding(copy, weight)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DFlareDraftModel:
        """Load a DFlare, DFlash or DFly checkpoint directory (config.json + safetensors).

        ``dtype`` None keeps the dtype config.json records (else the stored tensors').
        Every checkpoint tensor must match a parameter by name and shape (a DFly export's
        ``embed_tokens.weight`` is kept for :meth:`check_target_embedding`).
        """
        path = Path(path)
        raw = read_json(path / "config.json")
        config = DraftConfig.from_dict(raw)
        state = read_weights(path)
        dtype = dtype or saved_dtype(raw, state)
        embedding = state.pop(EMBEDDING, None) if config.fusion == "dfly" else None
        with torch.device("meta"):  # no init work: every parameter is replaced below
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_state(state, expected, path, config.fusion, FORMAT_NAMES[config.fusion])
        model.load_state_dict(from_file_names(state, config.fusion), assign=True)
        if model.draft_vocab_ids is not None:
            try:
                checked_draft_vocab(model.draft_vocab_ids, config.vocab_size)
            except ValueError as e:
                raise ValueError(f"draft_vocab_ids in {path}: {e}") from None
        model = model.to(device=device, dtype=dtype)
        model.exported_embedding = embedding
        return model

    def save_pretrained(self, path: str | Path, embedding: torch.Tensor | None = None) -> None:
        """Write config.json + model.safetensors in this draft's published format.

        ``embedding``: for DFly, the target's input embedding to export as DFly checkpoints
        do (``embed_tokens.weight``, in the draft's dtype; default: the copy this draft was
        loaded with, if still held); ignored for the other families."""
        dtype = self.norm.weight.dtype
        tensors = to_file_names(self.state_dict(), self.config.fusion)
        embedding = self.exported_embedding if embedding is None else embedding
        if embedding is not None and self.config.fusion == "dfly":
            tensors[EMBEDDING] = embedding.detach().to(dtype)
        write_checkpoint(Path(path), self.config.to_dict(dtype=dtype), tensors)
