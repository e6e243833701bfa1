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

Verify length: the scheduler reserves B = ``speculative_num_draft_tokens`` slots per request
and step; unless ``--speculative-num-draft-tokens`` fixed it, each decode step verifies only
the first n of them, n chosen by :mod:`.adaptive_length` (1 = plain decoding: the draft pass
is skipped, the target runs one token, the draft's context K/V is still written). A step at
n runs the parent's loop with the block-shaped state (block size, position offsets, buffers,
the draft's spec info) swapped for n's. Where SGLang's attention backends keep the width
they were built with (its GPU backends, with their CUDA graphs) every step verifies B for now.
"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import torch
from sglang.srt.speculative.dflash_utils import is_dense_head_weight
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.speculative.draft_worker_common import (
    build_block_pos_offsets,
    make_draft_block_spec_info,
)
from sglang.srt.speculative.spec_tp_sync import SpecTpSyncSite

from dflare_sgl._ext import require_gpu_kernels
from dflare_sgl.draft_checkpoint import check_exported_embedding
from dflare_sgl.layer_mix import layer_mix_kv
from dflare_sgl.sglang_plugin import cpu_linears
from dflare_sgl.sglang_plugin.adaptive_length import ServerVerifyLength
from dflare_sgl.verify import verify_block

logger = logging.getLogger(__name__)
# SGLang reserves KV slot 0 for writes of padded / dummy tokens.
PADDING_SLOT = 0
# Tokens per pass of layer_mix_kv's CUDA kernel over a long prefill (kTileTokens in
# csrc/layer_mix_kv_cuda.cu): its temporaries stop growing there.
PREFILL_TILE_TOKENS = 2048
# sglang normalises temperature 0 to (temperature 1, top_k 1): greedy.
_GREEDY_TOP_K = 1
# What DFlashWorkerV2 shapes by the block: swapped per verify length.
_BLOCK_SHAPED = (
    "block_size",
    "speculative_num_draft_tokens",
    "_block_pos_offsets",
    "_draft_block_spec_info",
    "_draft_block_ids_buf",
    "_draft_block_positions_buf",
    "_draft_block_tokens_buf",
    "_draft_verify_out_cache_loc_buf",
    "_draft_block_end_buf",
    "_draft_seq_lens_cpu_buf",
)


class _SkippedDraftPass:
    """The draft model runner during a step that verifies one token: nothing is drafted, so
    its ``forward`` runs no layer and hands the parent loop the one anchor row per request it
    slices off; everything else (KV pool, index translator) is the real runner's."""

    def __init__(self, runner, hidden_size: int, dtype: torch.dtype) -> None:
        self._runner, self._hidden_size, self._dtype = runner, hidden_size, dtype

    def forward(self, forward_batch):
        rows = torch.zeros(
            forward_batch.batch_size,
            self._hidden_size,
            dtype=self._dtype,
            device=forward_batch.input_ids.device,
        )
        return SimpleNamespace(
            logits_output=SimpleNamespace(hidden_states=rows), can_run_graph=False
        )

    def __getattr__(self, name):
        return getattr(self._runner, name)


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
        # Built at the first forward, when the attention backends it checks exist.
        self.verify_lengths: ServerVerifyLength | None = None
        self._length_fixed_by_flag = server_args.speculative_num_draft_tokens is not None
        self._length_state: dict[int, dict] = {}
        self._forward_on_host = torch.device(self.device).type == "cpu"
        from sglang.srt.runtime_context import get_parallel

        # The draft's greedy head on skinny_linear: one rank holding the whole vocabulary.
        self._skinny_head = (
            self._forward_on_host and cpu_linears.enabled() and get_parallel().tp_size == 1
        )
        self._draft_head: torch.Tensor | None = None  # the head's draft-vocabulary rows
        self._draft_head_key: tuple[int, int] | None = None

    def _adaptive_lengths(self) -> list[int] | None:
        """The lengths the policy may choose (any of 1 .. B), or None where every step verifies
        B: fixed by ``--speculative-num-draft-tokens`` (SGLang's startup record keeps the flag
        as given, None when absent), or where another length is not known to work yet."""
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.runtime_context import get_parallel

        block = int(self.block_size)
        if self._length_fixed_by_flag:
            return None
        reason = None
        if get_parallel().tp_size > 1 or get_parallel().attn_dp_enabled:
            # Every rank would need the same length each step; the choice is not broadcast yet.
            reason = "under tensor / attention-data parallelism"
        elif torch.device(self.device).type != "cpu":
            # SGLang's GPU attention backends and CUDA graphs keep the block width they were
            # built with; per-width ones (as its EAGLE adaptive mode builds per tier) are not
            # built here yet.
            reason = "on GPUs (per-length attention backends and graphs are not built yet)"
        elif not all(
            isinstance(getattr(r, "attn_backend", None), TorchNativeAttnBackend)
            for r in (self.model_runner, self.draft_model_runner)
        ):
            # torch_native reads each batch's block width; others keep the one they started with.
            reason = "with an attention backend other than torch_native"
        if reason is None:
            return list(range(1, block + 1))
        logger.warning("DFLARE verifies %d tokens every step %s", block, reason)
        return None

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

    # --- the verify length of each decode step ---------------------------------------------

    def forward_batch_generation(self, batch, *args, **kwargs):
        mode = batch.forward_mode
        decode = not (mode.is_extend() or batch.is_extend_in_batch or mode.is_idle())
        if self.verify_lengths is None:
            self.verify_lengths = ServerVerifyLength(
                int(self.block_size), self._adaptive_lengths(), capacity=64
            )
        if not decode:
            self.verify_lengths.other_forward()
            return super().forward_batch_generation(batch, *args, **kwargs)
        n = self.verify_lengths.begin_decode([req.rid for req in batch.reqs])
        with self._verifying(n, batch):
            result = super().forward_batch_generation(batch, *args, **kwargs)
        if self._forward_on_host:  # on a GPU the call returns before the device finishes
            self.verify_lengths.forward_done()
        return result

    @contextlib.contextmanager
    def _verifying(self, n: int, batch):
        """Run the parent's decode step as if the block were ``n`` tokens long."""
        block = int(self.block_size)
        if n == block:
            yield
            return
        full = {name: getattr(self, name) for name in _BLOCK_SHAPED}
        state = self._length_state.get(n)
        if state is None:  # the buffers are allocated by the parent at its first step
            state = dict.fromkeys(_BLOCK_SHAPED)
            state.update(
                block_size=n,
                speculative_num_draft_tokens=n,
                _block_pos_offsets=build_block_pos_offsets(length=n, device=self.device),
                _draft_block_spec_info=make_draft_block_spec_info(
                    draft_token_num=n, device=self.device
                ),
            )
        runner, graphs = self.draft_model_runner, batch.can_run_decode_cuda_graph
        self.__dict__.update(state)
        self.draft_model.set_block_size(n)
        batch.can_run_decode_cuda_graph = False  # graphs (CPU graph runner) are captured for B
        if n == 1:
            hidden = int(self.draft_model.config.hidden_size)
            self.draft_model_runner = _SkippedDraftPass(runner, hidden, runner.dtype)
        try:
            yield
        finally:
            # The buffers the parent (re)allocated at this length are kept for its next step.
            self._length_state[n] = {name: getattr(self, name) for name in _BLOCK_SHAPED}
            self.__dict__.update(full)
            self.draft_model.set_block_size(block)
            self.draft_model_runner, batch.can_run_decode_cuda_graph = runner, graphs

    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        if self.verify_lengths is not None:
            self.verify_lengths.verified(num_correct_drafts_per_req, batch_size)

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        if self.verify_lengths is not None:
            self.verify_lengths.finished(rid)

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

    # --- drafting ----------------------------------------------------------------------------

    def _greedy_sample_from_vocab_parallel_head(self, *, hidden_states, lm_head, chunk_size=256):
        """The draft's greedy tokens over the target's head. On a CPU with one rank and a
        plain head: over the draft's own vocabulary where it has one (``draft_vocab_ids``, as
        the reference engine drafts), its few rows on skinny_linear (see :mod:`.cpu_linears`).
        Elsewhere SGLang's full-vocabulary head (tensor-parallel, in its CUDA graphs)."""
        weight = getattr(lm_head, "weight", None)
        shard = getattr(lm_head, "shard_indices", None)
        if not (
            self._skinny_head
            and is_dense_head_weight(weight)
            and (shard is None or int(shard.num_added_elements) == 0)
        ):
            return super()._greedy_sample_from_vocab_parallel_head(
                hidden_states=hidden_states, lm_head=lm_head, chunk_size=chunk_size
            )
        ids = getattr(self.draft_model, "draft_vocab_ids", None)
        if ids is None:
            vocab = weight.shape[0] if shard is None else int(shard.num_org_elements)
            return cpu_linears.greedy_head_tokens(hidden_states, weight[:vocab])
        key = (weight.data_ptr(), weight._version)  # a live weight update bumps the version
        if self._draft_head_key != key:
            self._draft_head, self._draft_head_key = weight[ids].contiguous(), key
        return ids[cpu_linears.greedy_head_tokens(hidden_states, self._draft_head)]

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
