"""The DFly draft model on SGLang's layers: AngelSpec's ``Qwen3DFlyModel`` format.

DFly (DESIGN.md s.2, :mod:`dflare_sgl.draft_config`) is a DFlash draft whose context gets a
DFlare-style per-layer residual: draft layer d reads
``ctx_d = hidden_norm(fc(concat_t hs_t) + sum_t softmax(layer_fusion_weights)[d, t] hs_t)``
through its ordinary ``k_proj / v_proj`` (the DFLARE worker writes those K/V with
``layer_mix_kv``), and a correction head turns each block slot's final state into
``h_i + SwiGLU([norm(h_i); norm(E[token at slot i-1]))``.

The correction runs inside :meth:`forward`, after the backbone: slot i needs the token the
draft picks at slot i-1 (greedy over the target's ``lm_head``, bound by the worker), so the
forward returns the corrected states and SGLang's own draft head reads the same tokens back
from them. Keeping the chain in the draft forward keeps it inside the draft CUDA graph, with
no host sync.

Checkpoints load as published: ``context_proj`` / ``context_norm`` / ``final_norm`` are
SGLang's ``fc`` / ``hidden_norm`` / ``norm``; the exported ``embed_tokens.weight`` is kept
aside until the worker checks it against the target's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from sglang.srt.models.dflash import DFlashDraftModel
from sglang.srt.runtime_context import get_parallel
from torch import nn

from dflare_sgl.draft_checkpoint import EMBEDDING, FILE_NAMES
from dflare_sgl.hidden_correction import HiddenCorrection
from dflare_sgl.layer_mix import LayerMixWeights
from dflare_sgl.sglang_plugin.models.layer_mix_params import StackedParameters, context_rope_table

_MODEL_NAMES = {file: model for model, file in FILE_NAMES["dfly"].items()}


class Qwen3DFlyModel(DFlashDraftModel):
    # The parent's fused context-KV helper knows one shared context for every layer.
    supports_fused_context_kv = False

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        # SGLang's DFlash reads num_target_layers as the target's depth; DFly's counts the
        # captured layers and keeps the depth in target_num_hidden_layers.
        config = copy.copy(config)
        config.num_target_layers = getattr(config, "target_num_hidden_layers", None)
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        if quant_config is not None:
            raise ValueError(
                "DFLARE drafts are not quantized: drop --speculative-draft-* quantization"
            )
        if get_parallel().tp_size != 1:
            raise ValueError(
                "DFLARE serves DFly drafts at tensor parallel size 1: its correction head "
                "picks tokens over the whole lm_head; drop --tp-size"
            )
        if int(getattr(config, "target_hidden_size", config.hidden_size)) != config.hidden_size:
            raise ValueError("DFly needs target_hidden_size == hidden_size")
        self.layer_fusion_weights = nn.Parameter(
            torch.empty(len(self.layers), self.num_context_features), requires_grad=False
        )
        self.hidden_correction = (
            HiddenCorrection(
                int(config.hidden_size),
                getattr(config, "hidden_correction_intermediate_size", None),
                float(self.rms_norm_eps),
            )
            if getattr(config, "enable_hidden_correction", True)
            else None
        )
        # What layer_mix_kv reads, stored in place: the layers' fused qkv weights (and biases)
        # and their k_norm weights, each as one stacked tensor.
        attns = [layer.self_attn for layer in self.layers]
        self._qkv_weight = StackedParameters([a.qkv_proj.weight for a in attns])
        has_bias = attns[0].qkv_proj.bias is not None
        self._qkv_bias = StackedParameters([a.qkv_proj.bias for a in attns]) if has_bias else None
        self._k_norm = StackedParameters([a.k_norm.weight for a in attns])
        self._rope_table: torch.Tensor | None = None
        self._loaded = False
        # DFly's frozen copy of the target embedding: checked by the worker, then dropped.
        self.exported_embedding: torch.Tensor | None = None
        self._head_weight: torch.Tensor | None = None
        self._target_embedding: nn.Module | None = None

    def bind_target(self, head_weight: torch.Tensor, embedding: nn.Module) -> None:
        """The target's ``lm_head`` rows (real vocabulary only) and input embedding, which
        the correction chain drafts with."""
        self._head_weight = head_weight
        self._target_embedding = embedding

    def project_target_hidden(self, target_hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "a DFly draft's per-layer context K/V are written by the DFLARE worker "
            "(layer_mix_kv); serve it with --speculative-algorithm DFLARE"
        )

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, **kwargs):
        # SGLang's ModelRunner hands input embeddings over as bfloat16 whatever the model
        # dtype (model_runner.py, `input_embeds.bfloat16()`); bring them to the draft's.
        if input_embeds is not None:
            input_embeds = input_embeds.to(self.norm.weight.dtype)
        out = super().forward(input_ids, positions, forward_batch, input_embeds, **kwargs)
        hidden = out.hidden_states
        if self.hidden_correction is None or hidden is None or hidden.numel() == 0:
            return out
        if self._head_weight is None:
            raise RuntimeError("the DFLARE worker binds the target head before drafting")
        block = int(self.block_size)
        states = hidden.view(-1, block, hidden.shape[-1])
        head = self._head_weight
        corrected, _ = self.hidden_correction.draft(
            states,
            input_ids.view(-1, block)[:, 0],  # the anchor, embedded in full precision
            self._target_embedding,
            lambda h: torch.matmul(h.to(head.dtype), head.T).argmax(-1),
        )
        out.hidden_states = torch.cat([states[:, :1], corrected], dim=1).view_as(hidden)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load DFly's names through the parent's mapping, then insist every DFly tensor was
        present (a DFlash checkpoint under this architecture would otherwise load silently)."""
        seen: set[str] = set()

        def renamed():
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name == EMBEDDING:
                    self.exported_embedding = tensor.detach().clone()
                    continue
                name = _MODEL_NAMES.get(name, name)
                seen.add(name)
                yield name, tensor

        super().load_weights(renamed())
        if self._loaded:  # a live weight update may send any subset of the tensors
            return
        self._loaded = True
        required = ["layer_fusion_weights", "fc.weight", "hidden_norm.weight", "norm.weight"]
        if self.hidden_correction is not None:
            names = [n for n, _ in self.hidden_correction.named_parameters()]
            required += [f"hidden_correction.{n}" for n in names]
        missing = [name for name in required if name not in seen]
        if missing:
            raise ValueError(
                f"not a DFly checkpoint: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )

    def layer_mix_weights(self) -> LayerMixWeights:
        """What ``layer_mix_kv`` reads: both mixes, and each layer's K and V rows of its fused
        ``qkv_proj`` (context and block share them, as in DFlash), as views of the
        parameters' own storage (current after live weight updates, no second copy)."""
        attn = self.layers[0].self_attn
        if self._rope_table is None:
            self._rope_table = context_rope_table(attn.rotary_emb, attn.head_dim)
        q, kv = attn.q_size, attn.kv_size
        qkv = self._qkv_weight.tensor()  # [D, q + 2 kv, H]: V rows right after K rows
        qkv_bias = None if self._qkv_bias is None else self._qkv_bias.tensor()
        return LayerMixWeights(
            fusion_probs=self.layer_fusion_weights.float().softmax(-1),
            fc_weight=self.fc.weight,
            hidden_norm_weight=self.hidden_norm.weight,
            k_proj_weight=qkv[:, q : q + kv],
            v_proj_weight=qkv[:, q + kv : q + 2 * kv],
            k_proj_bias=None if qkv_bias is None else qkv_bias[:, q : q + kv],
            v_proj_bias=None if qkv_bias is None else qkv_bias[:, q + kv : q + 2 * kv],
            k_norm_weight=self._k_norm.tensor(),
            eps=float(self.rms_norm_eps),
            cos_sin_cache=self._rope_table,
        )


EntryClass = [Qwen3DFlyModel]
