"""The DFLARE speculative worker: SGLang's ``DFlashWorkerV2`` with the project's two ops.

Everything around the two ops is SGLang's own DFlash spec-v2 loop (block drafting in
TARGET_VERIFY mode over the draft KV pool, target verify, the scheduler's allocator and
radix cache). This class replaces exactly:

* the draft context K/V materialisation: one ``dflare_sgl.layer_mix.layer_mix_kv`` call
  writes every draft layer's K/V straight into SGLang's draft KV pool at the pool's slots
  (DFlare's per-layer mix; DFlash's version loops over layers with one shared context);
* verification: ``dflare_sgl.verify.verify_block`` for greedy AND sampled requests
  (temperature, top-k, top-p with Gumbel-max over seeded Philox noise), on every device.
  SGLang's DFlash falls back to greedy verification where its sampling kernels are missing
  (CPU); DFLARE never does.

Slots: the verify block's KV slots come from SGLang's allocator (over-allocated per
request, like DFLASH); verification only decides how many of them become committed
(``commit_lens``), and the scheduler frees the rest. Draft K/V rows of rejected positions
are sent to the pool's padding slot 0 (the slot SGLang reserves for dummy writes), so no
slot outside the committed prefix is written.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.speculative.spec_tp_sync import SpecTpSyncSite

from dflare_sgl._ext import require_gpu_kernels
from dflare_sgl.draft_checkpoint import check_exported_embedding
from dflare_sgl.layer_mix import layer_mix_kv
from dflare_sgl.verify import verify_block

logger = logging.getLogger(__name__)
# SGLang reserves KV slot 0 for writes of padded / dummy tokens.
PADDING_SLOT = 0
# Tokens per pass of layer_mix_kv's CUDA kernel over a long prefill (kTileTokens in
# csrc/layer_mix_kv_cuda.cu): its temporaries stop growing there.
PREFILL_TILE_TOKENS = 2048
# sglang normalises temperature 0 to (temperature 1, top_k 1): greedy.
_GREEDY_TOP_K = 1


class DFlareWorker(DFlashWorkerV2):
    """``--speculative-algorithm DFLARE``: a DFlash spec-v2 worker for DFlare and DFly drafts."""

    def __init__(self, server_args, gpu_id, nccl_port, target_worker) -> None:
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        require_gpu_kernels(self.device)
        if not hasattr(self.draft_model, "layer_mix_weights"):
            raise ValueError(
                "DFLARE needs a QwenDFlareDraftModel or Qwen3DFlyModel draft, got "
                f"{type(self.draft_model).__name__}"
            )
        if self.lilicorr is not None or self.selector is not None or self._is_domino:
            raise ValueError("DFLARE drafts have no selector / LiLiCorr / Domino heads")
        if hasattr(self.draft_model, "bind_target"):  # DFly: its correction head drafts
            self._bind_dfly_target()
        # Fresh Philox keys per verify step for requests without a sampling seed.
        self._seed_generator = torch.Generator(device=self.device)
        self._seed_generator.manual_seed(int(server_args.random_seed or 0))

    def _bind_dfly_target(self) -> None:
        """Give a DFly draft the target's real-vocabulary ``lm_head`` rows and embedding,
        after checking the embedding its checkpoint exported."""
        from sglang.srt.lora.layers import unwrap_lora_layer

        def real_rows(layer) -> torch.Tensor:
            # SGLang pads vocabulary-parallel tables; the rows past the real vocabulary are 0.
            shard = getattr(layer, "shard_indices", None)
            return layer.weight if shard is None else layer.weight[: int(shard.num_org_elements)]

        target = self.target_worker.model_runner.model
        embedding = target.get_input_embeddings()
        copy, self.draft_model.exported_embedding = self.draft_model.exported_embedding, None
        if copy is not None:
            check_exported_embedding(copy, real_rows(embedding))
        self.draft_model.bind_target(real_rows(unwrap_lora_layer(target.lm_head)), embedding)

    # --- start-up memory rehearsal ---------------------------------------------------------

    def prewarm_sampling(self):
        """Rehearse what a DFLARE step allocates at its largest shapes before SGLang sizes the
        KV pool: ``verify_block`` over the largest verify batch with filtered sampling, and the
        draft context write (``layer_mix_kv``) over one prefill tile into the padding slot.
        (DFlashWorkerV2 rehearses DFlash's own sampled verify, which DFLARE never runs.)
        On a GPU the peak is reported as headroom beside the target sampler's."""
        from sglang.srt.model_executor.model_runner import SamplingPrewarmResult

        result = self.model_runner.prewarm_sampling()  # the target's sampler (first tokens)
        cuda = torch.device(self.device).type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        block = int(self.block_size)
        bs = self._prewarm_batch_size(block)
        logits = torch.zeros(bs * block, self.model_config.vocab_size, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        verify_block(
            draft_tokens=torch.zeros(bs, block - 1, **i64),
            logits=logits,
            seq_lens=torch.zeros(bs, **i64),
            remaining=torch.full((bs,), block, **i64),
            temperatures=torch.ones(bs, device=self.device),
            top_k=torch.full((bs,), 20, **i64),
            top_p=torch.full((bs,), 0.95, device=self.device),
            seeds=torch.zeros(bs, **i64),
            stop_token_ids=torch.empty(bs, 0, **i64),
            block_slots=torch.full((bs, block), PADDING_SLOT, **i64),
        )
        w = self.draft_model.layer_mix_weights()
        t, h = w.fusion_probs.shape[1], w.hidden_norm_weight.shape[0]
        chunk = int(self.server_args.chunked_prefill_size or 0)
        # The CUDA kernel works through long prefills in tiles of PREFILL_TILE_TOKENS tokens.
        tokens = min(chunk, PREFILL_TILE_TOKENS) if chunk > 0 else PREFILL_TILE_TOKENS
        self._append_target_hidden_to_draft_kv_by_loc(
            target_hidden=torch.zeros(tokens, t * h, dtype=w.hidden_norm_weight.dtype,
                                      device=self.device),
            cache_loc=torch.full((tokens,), PADDING_SLOT, **i64),
            positions=torch.zeros(tokens, **i64),
        )  # fmt: skip
        peak = None
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
        logger.info(
            "DFLARE pre-warm: verify_block %dx%dx%d (top-k/top-p), layer_mix_kv %d tokens, "
            "peak %s bytes", bs, block, logits.shape[1], tokens, peak,
        )  # fmt: skip
        if peak is None:
            return result
        return SamplingPrewarmResult(
            sampling_input_bytes=max(result.sampling_input_bytes, logits.nbytes),
            sampling_headroom_bytes=max(result.sampling_headroom_bytes, peak),
        )

    # --- draft context K/V -----------------------------------------------------------------

    def _draft_kv_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``[num_slots, KVH, hd]`` K and V buffers of the draft KV pool, looked up
        per call: SGLang may resize the pool after CUDA-graph capture."""
        pool = self.draft_model_runner.token_to_kv_pool
        attn = [layer.self_attn.attn for layer in self.draft_model.layers]
        if getattr(pool, "is_quantized_kv_cache", False) or getattr(pool, "use_hnd", False):
            raise ValueError(
                "DFLARE writes the draft KV pool directly and needs SGLang's plain "
                "[slots, heads, head_dim] layout: drop the quantized / HND KV cache option"
            )
        if any(a.k_scale is not None or a.v_scale is not None for a in attn):
            raise ValueError("DFLARE does not support scaled (fp8 with scales) draft KV caches")
        return (
            [pool._get_key_buffer(a.layer_id) for a in attn],
            [pool._get_value_buffer(a.layer_id) for a in attn],
        )

    def _append_target_hidden_to_draft_kv_by_loc(
        self,
        *,
        target_hidden: torch.Tensor,
        cache_loc: torch.Tensor,
        positions: torch.Tensor,
        cache_loc_2d: torch.Tensor | None = None,
        commit_lens: torch.Tensor | None = None,
        extend_lens: torch.Tensor | None = None,
    ) -> None:
        """Write the draft's context K/V of N tokens at ``cache_loc`` with ``layer_mix_kv``.

        Args:
          target_hidden: ``[>= N, T*H]`` captured target layers, concatenated (rows past N
            are alignment padding).
          cache_loc: ``[N]`` draft pool slots; positions: ``[N]`` absolute positions.
          cache_loc_2d, commit_lens: after a verify, ``[bs, B]`` slots of the verify blocks
            and ``[bs]`` committed counts: only the committed prefix of each block is kept.
        """
        n = cache_loc.numel()
        if n == 0:
            return
        w = self.draft_model.layer_mix_weights()  # views: current after weight updates
        t, h = w.fusion_probs.shape[1], w.hidden_norm_weight.shape[0]
        hidden = target_hidden[:n].to(w.hidden_norm_weight.dtype).reshape(n, t, h).contiguous()
        slots = cache_loc.to(torch.int64)
        if commit_lens is not None:
            block = cache_loc_2d.shape[1]
            offsets = torch.arange(block, device=slots.device)
            kept = (offsets[None, :] < commit_lens[:, None]).flatten()
            slots = torch.where(kept, slots, PADDING_SLOT)
        k_caches, v_caches = self._draft_kv_caches()
        with torch.inference_mode():
            layer_mix_kv(hidden, w, positions.to(torch.int64), slots, k_caches, v_caches)

    # --- verification ----------------------------------------------------------------------

    def _validate_phase1_sampling_support(self, batch) -> None:
        """Nothing to warn about: every sampled request is verified exactly (min_p requests
        are refused at admission, ``spec.refuse_unsupported_request``)."""

    def _can_skip_verify_logits(self, batch, sampling_info) -> bool:
        return False  # verify_block reads the logits itself, greedy rows included

    def _sampling_rows(self, sampling_info, bs: int):
        """Per-request (temperatures f32, top_k i64, top_p f32, seeds i64), each ``[bs]``."""
        device = self.device
        if sampling_info is None:  # greedy: temperature 0, no filters
            zeros = torch.zeros(bs, dtype=torch.int64, device=device)
            return zeros.float(), zeros, zeros.float() + 1, zeros
        top_k = sampling_info.top_ks.to(torch.int64).view(bs)
        temperatures = sampling_info.temperatures.to(torch.float32).view(bs)
        temperatures = torch.where(top_k == _GREEDY_TOP_K, 0.0, temperatures)
        top_p = sampling_info.top_ps.to(torch.float32).view(bs)
        if sampling_info.sampling_seed is not None:
            seeds = sampling_info.sampling_seed.to(torch.int64).view(bs)
        else:
            seeds = torch.randint(0, 2**62, (bs,), generator=self._seed_generator, device=device)
        return temperatures, top_k, top_p, seeds

    def _accept_block(
        self,
        *,
        candidates: torch.Tensor,
        next_token_logits: torch.Tensor,
        sampling_info,
        draft_input,
        prefix_lens: torch.Tensor,
        bs: int,
        target_predict: torch.Tensor | None = None,
    ):
        """Accept a prefix of each drafted block with ``verify_block``.

        ``candidates [bs, B]`` is ``[x_last, d_1 .. d_{B-1}]`` at positions
        ``prefix_lens + k``; ``next_token_logits [bs*B, V]``. Returns DFlashWorkerV2's
        ``(accept_len, commit_lens, bonus, out_tokens, new_seq_lens)``.
        """
        block = int(self.block_size)
        temperatures, top_k, top_p, seeds = self._sampling_rows(sampling_info, bs)
        result = verify_block(
            draft_tokens=candidates[:, 1:].to(torch.int64).contiguous(),
            logits=next_token_logits,
            seq_lens=prefix_lens.to(torch.int64),
            # The scheduler cuts at stop tokens and max_new_tokens on the committed tokens.
            remaining=torch.full((bs,), block, dtype=torch.int64, device=self.device),
            temperatures=temperatures,
            top_k=top_k,
            top_p=top_p,
            seeds=seeds,
            stop_token_ids=torch.empty((bs, 0), dtype=torch.int64, device=self.device),
            block_slots=self._draft_verify_out_cache_loc_buf[:bs].to(torch.int64),
        )
        # Under tensor parallelism every rank verifies its copy of the logits; as DFlash does,
        # rank 0's decision is broadcast (SGLANG_SPEC_TP_SYNC selects the sites), so that
        # reductions ordered differently across ranks cannot make them commit different tokens.
        greedy = sampling_info is None or bool(getattr(sampling_info, "is_all_greedy", False))
        site = SpecTpSyncSite.DFLASH_ACCEPT_GREEDY
        if not greedy:
            site = SpecTpSyncSite.DFLASH_ACCEPT_SAMPLE
        for decided in (result.accept_lens, result.num_committed, result.committed):
            self._tp_sync.sync(site, decided)
        rows = torch.arange(bs, device=self.device)
        bonus = result.committed[rows, result.num_committed - 1]
        out_tokens = result.committed.clamp_min(0)
        return (
            result.accept_lens.to(torch.int32),
            result.num_committed.to(torch.int32),
            bonus,
            out_tokens,
            result.new_seq_lens.to(prefix_lens.dtype),
        )
