"""The DFlare draft model on SGLang's layers: AngelSlim's ``QwenDFlareDraftModel`` format.

A DFlare draft is a DFlash draft whose context conditioning is layer-wise (DESIGN.md s.2):
instead of one ``fc(concat_t hs_t)`` shared by all layers, draft layer d reads
``ctx_d = hidden_norm(sum_t softmax(layer_fusion_weights)[d, t] * hs_t)`` through its own
``k_proj_target / v_proj_target``. The block tokens go through the same attention, MLP and
norms as SGLang's :class:`~sglang.srt.models.dflash.DFlashDraftModel` (tensor-parallel
linears, ``RadixAttention`` over the draft KV pool), so this class only adds the DFlare
tensors. The context K/V are not computed here: the DFLARE worker writes them into the
draft KV pool with the fused ``layer_mix_kv`` op, from :meth:`layer_mix_weights`.

Checkpoints (AngelSlim DFlare, or ``dflare init-draft`` / the trainer) load unchanged:
``layers.{i}.self_attn.{q,k,v,o}_proj`` and the MLP are stacked into SGLang's fused
linears by the parent loader, ``k_proj_target / v_proj_target``, ``layer_fusion_weights``
and ``hidden_norm`` load by name, and ``draft_vocab_ids`` (a reduced draft vocabulary)
becomes :attr:`draft_vocab_ids`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sglang.srt.layers.linear import ColumnParallelLinear
from sglang.srt.models.dflash import DFlashDraftModel
from sglang.srt.runtime_context import get_parallel
from torch import nn

from dflare_sgl.draft_checkpoint import checked_draft_vocab
from dflare_sgl.layer_mix import LayerMixWeights
from dflare_sgl.sglang_plugin.models.layer_mix_params import StackedParameters, context_rope_table


class QwenDFlareDraftModel(DFlashDraftModel):
    # The parent's fused context-KV helper assumes one shared context for every layer.
    supports_fused_context_kv = False

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        if quant_config is not None:
            raise ValueError(
                "DFLARE drafts are not quantized: drop --speculative-draft-* quantization"
            )
        del self.fc  # DFlare has no shared projection
        num_layers = len(self.layers)
        tp_size = get_parallel().tp_size
        attn0 = self.layers[0].self_attn
        if attn0.total_num_kv_heads % tp_size:
            raise ValueError(
                f"DFLARE shards the draft's {attn0.total_num_kv_heads} KV heads over tensor "
                f"parallel ranks: use a --tp-size that divides {attn0.total_num_kv_heads}"
            )
        self.layer_fusion_weights = nn.Parameter(
            torch.empty(num_layers, self.num_context_features), requires_grad=False
        )
        bias = bool(getattr(config, "attention_bias", False))
        kv_out = attn0.total_num_kv_heads * attn0.head_dim
        attns = [layer.self_attn for layer in self.layers]
        for attn in attns:
            attn.k_proj_target = ColumnParallelLinear(attn.hidden_size, kv_out, bias=bias)
            attn.v_proj_target = ColumnParallelLinear(attn.hidden_size, kv_out, bias=bias)
        # What layer_mix_kv reads, stored in place: each layer's K rows then its V rows
        # ([D, 2, O, H], so the op projects both in one GEMM), and the k_norm weights.
        kv = [p for a in attns for p in (a.k_proj_target.weight, a.v_proj_target.weight)]
        self._kv_weight = StackedParameters(kv)
        kv_bias = [p for a in attns for p in (a.k_proj_target.bias, a.v_proj_target.bias)]
        self._kv_bias = StackedParameters(kv_bias) if bias else None
        self._k_norm = StackedParameters([a.k_norm.weight for a in attns])
        self._rope_table: torch.Tensor | None = None
        self._loaded = False
        # The target tokens the draft may propose (the checkpoint's ``draft_vocab_ids``), or
        # None for all of them; the worker's CPU head reads only those rows.
        self.draft_vocab_ids: torch.Tensor | None = None

    def project_target_hidden(self, target_hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "a DFlare draft has no shared context projection: its per-layer context K/V are "
            "written by the DFLARE worker (layer_mix_kv); serve it with "
            "--speculative-algorithm DFLARE"
        )

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, **kwargs):
        # SGLang's ModelRunner hands input embeddings over as bfloat16 whatever the model
        # dtype (model_runner.py, `input_embeds.bfloat16()`); bring them to the draft's.
        if input_embeds is not None:
            input_embeds = input_embeds.to(self.norm.weight.dtype)
        return super().forward(input_ids, positions, forward_batch, input_embeds, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load by the parent's name mapping, then insist every DFlare tensor was present
        (a DFlash checkpoint under this architecture name would otherwise load silently)."""
        seen: set[str] = set()

        def recorded():
            for name, tensor in weights:
                name_in_model = name.removeprefix("model.")
                seen.add(name_in_model)
                if name_in_model == "draft_vocab_ids":  # not a parameter: the parent skips it
                    ids = checked_draft_vocab(tensor, self.config.vocab_size)
                    self.draft_vocab_ids = ids.to(self.norm.weight.device)
                    continue
                yield name, tensor

        super().load_weights(recorded())
        if self._loaded:  # a live weight update may send any subset of the tensors
            return
        self._loaded = True
        required = ["layer_fusion_weights", "hidden_norm.weight"] + [
            f"layers.{i}.self_attn.{proj}.weight"
            for i in range(len(self.layers))
            for proj in ("k_proj_target", "v_proj_target")
        ]
        missing = [name for name in required if name not in seen]
        if missing:
            raise ValueError(
                f"not a DFlare checkpoint: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )

    def layer_mix_weights(self) -> LayerMixWeights:
        """What ``layer_mix_kv`` reads (this rank's KV-head shard), as views of the parameters'
        own storage: current after live weight updates, and no second copy. Cheap to build
        per call (views and a [D, T] softmax). RoPE uses the draft attention's own table, so
        context and block keys agree."""
        attn = self.layers[0].self_attn
        if self._rope_table is None:
            self._rope_table = context_rope_table(attn.rotary_emb, attn.head_dim)
        d = len(self.layers)
        kv = self._kv_weight.tensor().view(d, 2, *self._kv_weight.params[0].shape)
        kv_bias = None if self._kv_bias is None else self._kv_bias.tensor().view(d, 2, -1)
        return LayerMixWeights(
            fusion_probs=self.layer_fusion_weights.float().softmax(-1),
            fc_weight=None,
            hidden_norm_weight=self.hidden_norm.weight,
            k_proj_weight=kv[:, 0],
            v_proj_weight=kv[:, 1],
            k_proj_bias=None if kv_bias is None else kv_bias[:, 0],
            v_proj_bias=None if kv_bias is None else kv_bias[:, 1],
            k_norm_weight=self._k_norm.tensor(),
            eps=float(self.rms_norm_eps),
            cos_sin_cache=self._rope_table,
        )


EntryClass = [QwenDFlareDraftModel]
