"""Side-by-side decoding runs on the same prompts: the target's own greedy decoding (HF
``generate``, optionally with prompt-lookup decoding) against speculative decoding, and the
acceptance statistics of the latter. Used by ``dflare demo`` and the accuracy and ablation
benchmarks, so every number they print is measured the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from dflare_sgl.engine import GenerationResult, SamplingParams, SpeculativeDecoder, pooled_tau


@dataclass
class DecodeRun:
    """Outputs (token ids per prompt, the stop token included) and the wall time of one run."""

    outputs: list[list[int]]
    wall_s: float
    results: list[GenerationResult] = field(default_factory=list)  # speculative runs only
    block_size: int = 1  # tokens verified per step; 1 = no speculation

    def __add__(self, other: DecodeRun) -> DecodeRun:
        """Two runs' prompts as one run (their wall times add up)."""
        if self.block_size != other.block_size:
            raise ValueError("cannot add runs with different block sizes")
        return DecodeRun(
            self.outputs + other.outputs,
            self.wall_s + other.wall_s,
            self.results + other.results,
            self.block_size,
        )

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.outputs))

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _until_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
    return row[:end]


@torch.inference_mode()
def hf_greedy(
    target: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 1,
    prompt_lookup_tokens: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> DecodeRun:
    """The target's own greedy decoding with HF ``generate``, ``batch_size`` prompts at a time
    (left-padded). ``prompt_lookup_tokens`` switches on HF prompt-lookup decoding (batch size
    1 only, an HF limit). ``on_done(n)`` is called after each batch of ``n`` prompts."""
    if prompt_lookup_tokens and batch_size != 1:
        raise ValueError("HF prompt-lookup decoding supports batch size 1 only")
    device = next(target.parameters()).device
    pad = stop_ids[0]
    extra = {"prompt_lookup_num_tokens": prompt_lookup_tokens} if prompt_lookup_tokens else {}
    outputs: list[list[int]] = []
    _sync(device)
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[s : s + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = target.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad,
            **extra,
        )
        outputs += [_until_stop(row, stop_ids) for row in out[:, width:].tolist()]
        if on_done is not None:
            on_done(len(batch))
    _sync(device)
    return DecodeRun(outputs, time.perf_counter() - start)


def speculative(
    decoder: SpeculativeDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 1,
    on_commit: Callable[[int, int, list[int]], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> DecodeRun:
    """Greedy speculative decoding, ``batch_size`` prompts at a time.

    ``on_commit(prompt index, batch row, new tokens)`` streams tokens as they are committed;
    ``on_done(n)`` is called after each batch of ``n`` prompts."""
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
    results: list[GenerationResult] = []
    _sync(decoder.device)
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        stream = None if on_commit is None else lambda row, new, s=s: on_commit(s + row, row, new)
        results += decoder.generate(batch, params, on_commit=stream)
        if on_done is not None:
            on_done(len(batch))
    _sync(decoder.device)
    wall = time.perf_counter() - start
    return DecodeRun([r.tokens for r in results], wall, results, decoder.block_size)


@dataclass
class Acceptance:
    """Acceptance statistics of speculative steps verifying up to ``block_size`` tokens.

    ``histogram[k]``: steps that committed ``k + 1`` tokens (k accepted drafts + the bonus).
    ``rate_by_position[k]``: among the steps that verified draft ``k + 1``, the share that
    accepted it, i.e. committed more than ``k + 1`` tokens (drafts are accepted as a prefix).
    A step's verify length is its ``GenerationResult.verify_lengths`` entry (``block_size``
    where a result has none), so steps that chose a shorter block do not count as rejections.
    """

    tau: float
    steps: int
    histogram: list[int]
    rate_by_position: list[float]


def acceptance(results: Sequence[GenerationResult], block_size: int) -> Acceptance:
    steps = [
        (committed, verified)
        for r in results
        for committed, verified in zip(
            r.accept_lengths, r.verify_lengths or [block_size] * len(r.accept_lengths)
        )
    ]
    histogram = [0] * block_size
    for committed, _ in steps:
        histogram[min(committed, block_size) - 1] += 1
    rates = []
    for k in range(block_size - 1):
        seen = [committed for committed, verified in steps if verified >= k + 2]
        rates.append(sum(c > k + 1 for c in seen) / len(seen) if seen else 0.0)
    return Acceptance(pooled_tau(results), len(steps), histogram, rates)
