"""Lossless block speculative decoding in plain PyTorch: the reference engine.

One step for a batch of requests (DESIGN.md section 3), verifying n tokens::

    draft:   [x_last, MASK x (n-1)] --one draft forward--> d_1 .. d_{n-1}   (greedy)
    verify:  target([x_last, d_1 .. d_{n-1}]) -> logits z_0 .. z_{n-1}      (one causal pass)
    accept:  t_k = sample(z_k); keep d_k while d_k == t_{k-1}; bonus = t_a  (verify_block)
    commit:  accepted + bonus; the target KV of rejected positions is masked / dropped, and the
             draft gets the committed tokens' target hidden states as new context (layer_mix_kv)

The verify length n is chosen each step, from 1 (plain decoding: no draft pass, the target
decodes x_last alone) to the draft's block B, by :mod:`dflare_sgl.verify_length` from the
running acceptance and the measured step costs (:mod:`dflare_sgl.cost_model`), unless the
caller fixes it. The output never depends on n.

Sampling is Gumbel-max with noise that depends only on (request seed, position, token id), so
every committed token equals what target-only sampling with the same noise would emit: the
output distribution is exactly the target's, and greedy output is the target's greedy output.

Cache layouts. The target is a stock HF model with a ``DynamicCache``: requests are padded to
a common column count and each request's rejected columns stay as masked "holes" (columns past
the longest accepted prefix are cropped). The draft keeps only context K/V (the block is
recomputed each step), in a paged cache ``[num_slots, kv_heads, head_dim]`` per layer as in
SGLang, with request i's position p at slot ``i * capacity + p``; a request attends to its
first ``seq_len`` slots, so rejected positions are simply overwritten by the next step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence

import torch
from torch.profiler import record_function
from transformers import DynamicCache, PreTrainedModel

from dflare_sgl import cost_model as step_costs
from dflare_sgl._ext import warn_without_gpu_kernels
from dflare_sgl.cost_model import CostModel
from dflare_sgl.draft_model import DFlareDraftModel, capture_target_hidden
from dflare_sgl.layer_mix import layer_mix_kv
from dflare_sgl.request import (  # noqa: F401  (public names importable from the engine)
    GenerationResult,
    SamplingParams,
    pooled_tau,
    verify_length_counts,
)
from dflare_sgl.verify import sample_rows, verify_block
from dflare_sgl.verify_length import AdaptiveVerifyLength, FixedVerifyLength, VerifyLengthPolicy


def _drop_cache_tail(cache: DynamicCache, length: int) -> None:
    # A negative crop removes that many columns from the end in every transformers version
    # (a positive one means "keep this many" in 4.x and is rejected in 5.x).
    removed = cache.get_seq_length() - length
    if removed > 0:
        cache.crop(-removed)


class SpeculativeDecoder:
    """Batched DFlare / DFlash / DFly speculative decoding of an HF causal LM target.

    Args:
      target: HF causal LM (Llama, Qwen3, ...) whose forward returns ``hidden_states``; its
        input embedding and output head are the draft's too.
      draft: a draft model for this target (checked with ``draft.check_compatible``).
      block_size: fix the tokens verified per step (x_last + B-1 drafts; 1 = plain
        decoding). Default: chosen each step (:class:`AdaptiveVerifyLength`, up to the
        draft's block size) from the running acceptance and ``cost_model``.
      cost_model: the measured step costs for the adaptive choice. Default: the cached
        calibration for this device, models, dtype and thread count, made (in ~1 minute)
        the first time :meth:`generate` runs without one (:mod:`dflare_sgl.cost_model`).
      draft_head_dtype: dtype of the draft's token head (the target's ``lm_head`` weights,
        copied once). Draft tokens only decide what gets accepted, never what is committed,
        so a lower precision cannot change the output. Default: bfloat16 for a float32 target
        on CPU (the head is a memory-bound ``[B-1, H] x [H, V]`` product there, and bf16 halves
        the bytes it reads), else the head's own dtype. A draft with a reduced vocabulary
        (``draft.draft_vocab_ids``, N ids) gets only those N rows, so V becomes N.

    On CPU, switch the target's and draft's linears to ``torch.ops.dflare.skinny_linear`` first
    (:func:`dflare_sgl.skinny_linear.use_skinny_linear`, as ``dflare generate`` does): the
    linears of a 4-token verify pass then cost ~1.2x those of a 1-token decode instead of
    ~1.4x, and both take under half the time (``benchmarks/RESULTS.md``). The engine leaves
    the models as given.

    Each step runs under the ``torch.profiler.record_function`` label ``dflare.step`` and its
    parts under ``dflare.draft``, ``dflare.draft_head``, ``dflare.target_verify``,
    ``dflare.verify_block`` and ``dflare.commit``, so a profile splits a step's time without
    extra instrumentation (``benchmarks/profile_step.py``).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        draft: DFlareDraftModel,
        block_size: int | None = None,
        draft_head_dtype: torch.dtype | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        draft.check_compatible(target.config)
        draft.check_target_embedding(target.get_input_embeddings().weight)
        self.target = target.eval()
        self.draft = draft.eval()
        self.device = next(target.parameters()).device
        warn_without_gpu_kernels(self.device)
        # The longest verify step: the draft's own block unless fixed.
        self.block_size = int(draft.block_size if block_size is None else block_size)
        self.adaptive = block_size is None
        self.verify_length: VerifyLengthPolicy = FixedVerifyLength(self.block_size)
        self.cost_model = cost_model
        if self.adaptive and cost_model is not None:
            self.set_cost_model(cost_model)
        self.draft_dtype = next(draft.parameters()).dtype
        with torch.no_grad():  # stacked once; the op takes plain tensors, not parameters
            self.mix_weights = draft.layer_mix_weights()
        self.embed = target.get_input_embeddings()
        # transformers >= 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old
        # name still works there, with a deprecation warning on every call site).
        forward_args = inspect.signature(target.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        head = target.get_output_embeddings().weight
        if draft_head_dtype is None:
            cpu_fp32 = self.device.type == "cpu" and head.dtype == torch.float32
            draft_head_dtype = torch.bfloat16 if cpu_fp32 else head.dtype
        # Draft token i of the head's output is target token draft_vocab[i] (None: i itself).
        self.draft_vocab = draft.draft_vocab_ids
        if self.draft_vocab is not None:
            self.draft_vocab = self.draft_vocab.to(self.device)
            head = head[self.draft_vocab]
        self.draft_head = head.detach().to(draft_head_dtype).contiguous()
        self.max_positions = min(
            int(getattr(target.config, "max_position_embeddings", 1 << 30)),
            self.mix_weights.cos_sin_cache.shape[0],
        )

    # -- verify length ---------------------------------------------------------------------

    def set_cost_model(self, model: CostModel) -> None:
        """Choose verify lengths adaptively from ``model``'s costs (refused if it was
        measured for another setting or does not reach the block size)."""
        model.check_key(step_costs.decoder_key(self), "the cost model")
        if model.max_length < self.block_size:
            raise ValueError(
                f"the cost model stops at verify length {model.max_length}, the draft's block "
                f"is {self.block_size}: re-run `dflare calibrate --force` for this draft"
            )
        self.cost_model = model
        self.verify_length = AdaptiveVerifyLength(self.block_size, model.step_time)

    def calibrate(
        self, batch_sizes: Sequence[int] | None = None, use_cache: bool = True
    ) -> CostModel:
        """Use this setting's step costs: cached ones if ``use_cache`` and there are any, else
        measured now (verify lengths up to ``block_size``) and cached."""
        model = step_costs.load_or_calibrate(
            step_costs.decoder_key(self),
            lambda lengths, b: step_costs.measure_steps_ms(self, lengths, b),
            step_costs.default_lengths(self.block_size),
            tuple(batch_sizes or step_costs.default_batch_sizes(self.device)),
            use_cache=use_cache,
        )
        self.set_cost_model(model)
        return model

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_commit: Callable[[int, list[int]], None] | None = None,
        verify_length: VerifyLengthPolicy | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> list[GenerationResult]:
        """Decode every prompt (token ids) to completion.

        ``params`` is one setting for all requests or one per request. ``on_commit(i, tokens)``
        is called with each request's newly committed tokens as they appear (streaming).
        ``verify_length`` overrides the decoder's policy for this call (its ``max_length`` must
        not exceed ``block_size``); ``on_step(n, batch_size, seconds)`` reports each step's
        verify length, batch and wall time.
        """
        if verify_length is None:
            if self.adaptive and self.cost_model is None:
                self.calibrate()
            verify_length = self.verify_length
        if verify_length.max_length > self.block_size:
            raise ValueError(
                f"verify length up to {verify_length.max_length} exceeds block_size "
                f"{self.block_size}"
            )
        start = time.perf_counter()
        bs = len(prompts)
        plist = [params] * bs if isinstance(params, SamplingParams) else list(params)
        if len(plist) != bs:
            raise ValueError(f"got {len(plist)} SamplingParams for {bs} prompts")
        if bs == 0:
            return []
        B, dev = self.block_size, self.device
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("every prompt needs at least one token")
        budget = max(lens) + max(p.max_new_tokens for p in plist) + B
        if budget > self.max_positions:
            raise ValueError(
                f"prompt ({max(lens)} tokens) + max_new_tokens + block size ({B}) = {budget} "
                f"exceeds the model's {self.max_positions} positions: shorten the prompt or "
                "lower max_new_tokens"
            )

        # Per-request sampling state, as device tensors for verify_block.
        temps = torch.tensor([p.temperature for p in plist], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in plist], dtype=torch.int64, device=dev)
        top_p = torch.tensor([p.top_p for p in plist], dtype=torch.float32, device=dev)
        seeds = torch.tensor([p.seed for p in plist], dtype=torch.int64, device=dev)
        num_stops = max(len(p.stop_token_ids) for p in plist)
        stops = torch.full((bs, num_stops), -1, dtype=torch.int64, device=dev)
        for i, p in enumerate(plist):
            stops[i, : len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids, dtype=torch.int64)

        results = [GenerationResult() for _ in range(bs)]

        def commit(i: int, new: list[int]) -> bool:
            """Append request i's new tokens; True while it should keep decoding."""
            results[i].tokens.extend(new)
            if on_commit is not None:
                on_commit(i, new)
            if new[-1] in plist[i].stop_token_ids:
                results[i].finish_reason = "stop"
                return False
            return len(results[i].tokens) < plist[i].max_new_tokens

        verify_length.begin(bs)
        x_last, seq_lens = self._prefill(prompts, lens, budget, temps, top_k, top_p, seeds)
        # Request ids still decoding, in target-cache batch order.
        active = [
            i for i, p in enumerate(plist) if p.max_new_tokens > 0 and commit(i, [int(x_last[i])])
        ]
        self._select_target_rows(active, list(range(bs)))

        while active:
            t0 = time.perf_counter()
            n = verify_length.choose(active)
            with record_function("dflare.step"):
                ids = torch.tensor(active, device=dev)
                remaining = torch.tensor(
                    [plist[i].max_new_tokens - len(results[i].tokens) for i in active], device=dev
                )
                out = self._step(
                    ids,
                    x_last[ids],
                    seq_lens[ids],
                    remaining,
                    temps,
                    top_k,
                    top_p,
                    seeds,
                    stops,
                    n,
                )
                seq_lens[ids] = out.new_seq_lens
                n_committed, committed = out.num_committed.tolist(), out.committed.tolist()
                accept_lens = out.accept_lens.tolist()
                verify_length.observe(active, n, accept_lens)
                still = []
                for row, i in enumerate(active):
                    new = committed[row][: n_committed[row]]
                    r = results[i]
                    r.accept_lengths.append(len(new))
                    r.verify_lengths.append(n)
                    r.num_drafted += n - 1
                    r.num_accepted += accept_lens[row]
                    x_last[i] = new[-1]
                    if commit(i, new):
                        still.append(i)
                self._select_target_rows(still, active)
            # The step ended with host copies of its results (.tolist()), so its wall time is
            # the device's too.
            seconds = time.perf_counter() - t0
            verify_length.observe_time(n, len(active), seconds)
            if on_step is not None:
                on_step(n, len(active), seconds)
            active = still

        elapsed = time.perf_counter() - start
        for r in results:
            r.wall_time_s = elapsed
        return results

    # -- internals -------------------------------------------------------------------------

    def _prefill(self, prompts, lens, capacity, temps, top_k, top_p, seeds):
        """Target prefill of the left-padded batch; writes the prompts' draft context K/V.

        Returns the first generated token per request and ``seq_lens`` (tokens with KV).
        """
        bs, dev, width = len(prompts), self.device, max(lens)
        input_ids = torch.zeros(bs, width, dtype=torch.int64, device=dev)
        valid = torch.zeros(bs, width, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            input_ids[i, width - lens[i] :] = torch.tensor(list(p), dtype=torch.int64)
            valid[i, width - lens[i] :] = True
        positions = (valid.cumsum(-1) - 1).clamp_min(0)
        self.target_cache = DynamicCache()
        self.target_valid = valid
        # Only the last column's logits: the prompt's others are never read (a prefill's
        # [bs, width, V] head product would cost as much as a few decode steps).
        out = self._target_forward(input_ids, valid, positions, logits_to_keep=1)
        seq_lens = torch.tensor(lens, dtype=torch.int64, device=dev)
        first = sample_rows(out.logits[:, -1].float(), seq_lens - 1, temps, top_k, top_p, seeds)

        # Draft context cache: capacity slots per request (prompt + new tokens + one block).
        cfg = self.draft.config
        self.capacity = capacity
        shape = (bs * capacity, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches = [
            torch.zeros(shape, dtype=self.draft_dtype, device=dev)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.v_caches = [torch.zeros_like(k) for k in self.k_caches]
        hidden = capture_target_hidden(out.hidden_states, self.draft.target_layer_ids)
        rows = valid.nonzero(as_tuple=True)
        req_pos = positions[rows]
        self._write_context(hidden[rows], rows[0] * capacity + req_pos, req_pos)
        return first, seq_lens

    def _target_forward(self, input_ids, valid, positions, logits_to_keep: int = 0):
        """Target pass appending to the cache; ``valid`` [bs, columns] masks pads and holes.
        ``logits_to_keep``: logits of only the last that many columns (0: all)."""
        return self.target(
            input_ids=input_ids,
            attention_mask=valid.long(),
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.target_cache},
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )

    def _write_context(self, hidden, slots, positions):
        """Store the draft context K/V of tokens with target hidden ``[N, T, H]``."""
        layer_mix_kv(
            hidden.to(self.draft_dtype).contiguous(),
            self.mix_weights,
            positions,
            slots,
            self.k_caches,
            self.v_caches,
        )

    def _step(self, ids, x_last, seq_lens, remaining, temps, top_k, top_p, seeds, stops, B):
        """One step verifying ``B`` tokens (``B - 1`` drafts) for the active requests ``ids``."""
        bs = ids.numel()
        offsets = torch.arange(B, device=self.device)
        block_pos = seq_lens[:, None] + offsets  # [bs, B]
        block_slots = ids[:, None] * self.capacity + block_pos

        # Draft: one forward over [x_last, MASK...] conditioned on the cached context (none
        # for B = 1: plain decoding).
        block = torch.full((bs, B), self.draft.mask_token_id, dtype=torch.int64, device=self.device)
        block[:, 0] = x_last
        if B > 1:
            self._draft_into(block, ids, block_pos, seq_lens)

        # Verify: one causal target pass over the block, appended after the cache columns.
        past = self.target_cache.get_seq_length()
        mask = torch.cat(
            [self.target_valid, torch.ones(bs, B, dtype=torch.bool, device=self.device)], dim=1
        )
        with record_function("dflare.target_verify"):
            out = self._target_forward(block, mask, block_pos)
        with record_function("dflare.verify_block"):
            res = verify_block(
                block[:, 1:].contiguous(),
                out.logits.reshape(bs * B, -1),
                seq_lens,
                remaining,
                temps[ids],
                top_k[ids],
                top_p[ids],
                seeds[ids],
                stops[ids],
                block_slots,
            )

        with record_function("dflare.commit"):
            # Keep target columns of the committed prefix, crop columns nobody kept.
            kept = offsets[None, :] < res.num_committed[:, None]
            self.target_valid = torch.cat([self.target_valid, kept], dim=1)
            width = past + int(res.num_committed.max())
            _drop_cache_tail(self.target_cache, width)
            self.target_valid = self.target_valid[:, :width]
            # Context K/V for every block position; rows past num_committed lie beyond the
            # new seq_len, are never attended to and get overwritten by the next step.
            hidden = capture_target_hidden(out.hidden_states, self.draft.target_layer_ids)
            self._write_context(hidden.flatten(0, 1), block_slots.flatten(), block_pos.flatten())
        return res

    def _draft_into(self, block, ids, block_pos, seq_lens):
        """Fill ``block[:, 1:]`` with the draft's greedy tokens."""
        ctx_len = int(seq_lens.max())
        ctx_slots = ids[:, None] * self.capacity + torch.arange(ctx_len, device=self.device)
        with record_function("dflare.draft"):
            hidden = self.draft.draft_block(
                self.embed(block).to(self.draft_dtype),
                block_pos,
                self.k_caches,
                self.v_caches,
                ctx_slots,
                seq_lens,
            )
        with record_function("dflare.draft_head"):
            # (DFly: B-1 head products one after another, each slot corrected by the last.)
            block[:, 1:] = self.draft.draft_tokens(
                hidden, block[:, 0], self.embed, self._draft_tokens
            )

    def _draft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy target token ids of draft states ``[..., H]`` through the draft head."""
        head = self.draft_head
        drafted = torch.nn.functional.linear(hidden.to(head.dtype), head).argmax(-1)
        return drafted if self.draft_vocab is None else self.draft_vocab[drafted]

    def _select_target_rows(self, keep: list[int], current: list[int]) -> None:
        """Drop finished requests from the target cache batch (``current`` -> ``keep``)."""
        if keep == current or not keep:
            return
        where = {r: row for row, r in enumerate(current)}
        index = torch.tensor([where[r] for r in keep], dtype=torch.int64, device=self.device)
        self.target_cache.batch_select_indices(index)
        self.target_valid = self.target_valid[index]
