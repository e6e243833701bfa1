"""How many tokens each DFLARE decode step verifies inside SGLang: 1 (plain decoding) .. B.

The policy is the reference engine's (:class:`dflare_sgl.verify_length.AdaptiveVerifyLength`:
expected committed tokens per unit of step time, per-request acceptance leaning on the
batch-wide record, hysteresis, probes); this module adapts its inputs to a server:

* **Requests come and go.** Each request id holds a row of the policy's acceptance counts
  while it runs; the row is cleared for the next request when the scheduler reports the
  request finished (rows of requests that vanished otherwise, e.g. aborted, are reclaimed
  when rows run out).
* **Costs are measured on the server's own traffic**, not calibrated beforehand: the time
  from the start of one decode step to the start of the next (when nothing else ran
  between) is recorded for the step's verify length and batch-size bucket (powers of two);
  it includes the scheduler's own per-step work, which every length pays. The first decode
  steps in a bucket try every length once, longest first, so the server calibrates itself
  on first use; a length's cost is the median of its last few steps, and lengths not
  measured in a bucket are interpolated from those that were.
* **Acceptance arrives late.** SGLang hands the accepted counts to the worker once they are on
  the host (``on_verify_complete_cpu``), a step late under the overlap scheduler; the
  steps decided but not yet reported wait in order, so no extra device sync is needed.

With ``--speculative-num-draft-tokens N`` every step verifies N; the histogram of verify
lengths, the measured step times and the acceptance by draft position are kept in both modes
and reported beside SGLang's ``avg_spec_accept_length`` in ``/server_info``.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

import numpy as np

from dflare_sgl.verify_length import AdaptiveVerifyLength

# Steps per verify length in the first decode steps of a batch-size bucket.
EXPLORE_ROUNDS = 1
# Steps whose times make up a (length, bucket) cost.
COST_WINDOW = 5


def batch_bucket(batch_size: int) -> int:
    """The power of two at or below ``batch_size``: steps are costed per bucket."""
    return 1 << (max(int(batch_size), 1).bit_length() - 1)


class MeasuredStepCosts:
    """Milliseconds of a decode step by verify length and batch-size bucket, from the last
    ``COST_WINDOW`` measured steps of each (median, so one stalled step does not price a
    length out)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = list(lengths)
        self._samples: dict[tuple[int, int], deque[float]] = {}

    def record(self, n: int, batch_size: int, ms: float) -> None:
        key = (n, batch_bucket(batch_size))
        self._samples.setdefault(key, deque(maxlen=COST_WINDOW)).append(ms)

    def _row(self, bucket: int) -> dict[int, float]:
        return {
            n: statistics.median(self._samples[(n, bucket)])
            for n in self.lengths
            if (n, bucket) in self._samples
        }

    def step_ms(self, n: int, batch_size: int) -> float:
        """The step time of length ``n`` at this batch size: measured in its bucket, else
        interpolated (linearly in n, flat past the ends) from the bucket's measured lengths,
        else the nearest bucket's; 1.0 for every length before anything is measured."""
        bucket = batch_bucket(batch_size)
        buckets = sorted({b for _, b in self._samples}, key=lambda b: abs(b - bucket))
        for b in buckets:
            row = self._row(b)
            if row:
                ns = sorted(row)
                return float(np.interp(n, ns, [row[k] for k in ns]))
        return 1.0

    def table(self) -> dict[str, dict[str, float]]:
        """``{bucket: {length: ms}}`` of what was measured (for ``/server_info``)."""
        buckets = sorted({b for _, b in self._samples})
        return {str(b): {str(n): round(ms, 3) for n, ms in self._row(b).items()} for b in buckets}


class ServerVerifyLength:
    """The verify length of each decode step of one DFLARE worker.

    Args:
      max_length: the block the scheduler reserves per request (``B``).
      lengths: the lengths it may choose (the worker passes 1 .. B); ``None``: fixed at
        ``max_length``.
      capacity: rows of acceptance counts to start with (doubled when more requests run).
      clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        max_length: int,
        lengths: Sequence[int] | None,
        capacity: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.max_length = max_length
        self.adaptive = lengths is not None
        self.lengths = sorted(set(lengths)) if lengths is not None else [max_length]
        self.costs = MeasuredStepCosts(self.lengths)
        # Fixed, the policy only keeps the acceptance record (shown in the report).
        self.policy = AdaptiveVerifyLength(
            max_length, self.costs.step_ms, lengths=lengths if self.adaptive else None
        )
        self.policy.begin(capacity)
        self.clock = clock
        self.chosen: Counter[int] = Counter()
        self._rows: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._explored: Counter[int] = Counter()  # exploration steps taken per bucket
        self._last_step: tuple[int, int, float] | None = None  # (n, batch size, start)
        self._reports: deque[tuple[list[str], int]] = deque()  # decided, not yet reported

    @property
    def capacity(self) -> int:
        """Rows of acceptance counts the policy holds."""
        return len(self.policy.accepted)

    # --- the worker's calls ----------------------------------------------------------------

    def begin_decode(self, rids: Sequence[str]) -> int:
        """A decode step of these requests starts now: its verify length."""
        now = self.clock()
        if self._last_step is not None:
            n, b, start = self._last_step
            self.costs.record(n, b, 1000.0 * (now - start))
        n = self._choose(list(rids))
        self.chosen[n] += 1
        self._last_step = (n, len(rids), now)
        self._reports.append((list(rids), n))
        return n

    def other_forward(self) -> None:
        """A prefill (or mixed, or idle) batch runs: the time until the next decode step is
        not a decode step's."""
        self._last_step = None

    def verified(self, accepted: Sequence[int], batch_size: int) -> None:
        """The oldest unreported decode step's accepted draft counts, in batch order."""
        if not self._reports:
            return
        rids, n = self._reports.popleft()
        if len(rids) != batch_size or len(accepted) != batch_size:
            self._reports.clear()  # out of step with the scheduler: start afresh
            return
        kept = [(self._rows[r], a) for r, a in zip(rids, accepted) if r in self._rows]
        if kept:
            rows, counts = zip(*kept)
            self.policy.observe(list(rows), n, list(counts))

    def finished(self, rid: str) -> None:
        row = self._rows.pop(rid, None)
        if row is not None:
            self._free.append(row)

    def report(self) -> dict:
        """What ``/server_info`` shows under ``dflare_verify_lengths``."""
        steps = sum(self.chosen.values())
        return {
            "adaptive": self.adaptive,
            "lengths": self.lengths,
            "decode_steps": steps,
            "steps_by_length": {str(n): self.chosen[n] for n in sorted(self.chosen)},
            "acceptance_by_position": [round(r, 4) for r in self.policy.batch_rates()],
            "step_ms": self.costs.table(),
        }

    # --- internals -------------------------------------------------------------------------

    def _choose(self, rids: list[str]) -> int:
        rows = [self._row(r, rids) for r in rids]
        if not self.adaptive:
            return self.max_length
        bucket = batch_bucket(len(rids))
        explored = self._explored[bucket]
        if explored < EXPLORE_ROUNDS * len(self.lengths):
            self._explored[bucket] += 1
            return self.lengths[::-1][explored % len(self.lengths)]
        return self.policy.choose(rows)

    def _row(self, rid: str, running: list[str]) -> int:
        row = self._rows.get(rid)
        if row is not None:
            return row
        if not self._free:  # requests that ended unreported (aborts): reclaim their rows
            alive = set(running)
            for stale in [r for r in self._rows if r not in alive]:
                self.finished(stale)
        if not self._free:  # more requests running than rows: double them
            rows = self.capacity
            self.policy.grow(rows)
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free.pop()
        self._rows[rid] = row
        self.policy.forget([row])
        return row
