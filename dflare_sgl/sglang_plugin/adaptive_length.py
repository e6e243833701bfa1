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
  between), split into the worker's forward, which is the step length's own, and the
  scheduler's work around it, which every length pays; a step's cost is relative to a plain
  step's at the same batch size (:class:`MeasuredStepCosts`). The server calibrates
  itself on first use: the first ``PLAIN_STEPS`` decode steps at each new batch-size bucket
  are plain, and the first steps of the server's life draft the longest and the shortest
  length once; the policy's own choices and its probes measure the rest. While it drafts, one
  step in ``PLAIN_REFRESH_STEPS`` at a bucket is plain, so the reference every drafted
  length is priced against stays current (otherwise it is whatever the server's first steps
  measured: one slow first step, 157 ms against ~70 typical, once made every drafted length
  look cheaper than plain decoding).
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

# Exploration steps at most per batch-size bucket (:meth:`ServerVerifyLength._exploration`).
EXPLORE_TRIES = 6
# Plain steps a bucket measures before its drafted steps are priced (the median of three
# outvotes one slow step), and decode steps at a bucket between two plain ones while it drafts.
PLAIN_STEPS = 3
PLAIN_REFRESH_STEPS = 64
# Steps whose times make up a cost: a batch size's plain step, a (length, bucket)'s ratio.
COST_WINDOW = 5


def batch_bucket(batch_size: int) -> int:
    """The power of two at or below ``batch_size``: drafted steps are costed per bucket."""
    return 1 << (max(int(batch_size), 1).bit_length() - 1)


class MeasuredStepCosts:
    """A decode step's time by verify length, relative to a plain (one-token) step of the
    same batch size, from two parts measured apart:

    * **the forward** (the worker's own pass: draft, target verify, acceptance), which
      belongs to the step's length exactly;
    * **the rest of the step** (the scheduler's work around it: the previous step's results,
      the next batch), which every length pays alike, kept per batch size over all steps.

    They are apart because only the forward is the length's own: the interval between the
    starts of two decode steps also holds whatever ran between them (under the overlap loop,
    the previous step's results). Timed whole, plain steps at one request read 78-83 ms in
    servers that barely drafted and 107-112 ms in servers that drafted often, on this CPU,
    and drafted steps' ratios to them came out low; their forwards read 67-84 ms in every
    server, and the rest 1-5 ms. Where the forward cannot be timed on the host (a GPU, whose
    host work overlaps the device's), a step is its whole interval and the rest is zero.

    Plain forwards and the rest are kept per exact batch size (median of the last
    ``COST_WINDOW``; interpolated in the batch size where that size has none). A drafted
    forward is priced by its time over the plain forward of its own batch size, so a bucket
    mixing batch sizes (4 holds 4 .. 7 requests) compares like with like. A length's forward
    ratio in a bucket is the median of its last ``COST_WINDOW`` steps there, and the bucket's
    lengths lie on a line through those medians (:meth:`_fit_lines`); a bucket that measured
    nothing borrows the nearest bucket's line. Forward ratios change less with the batch size
    than times do, so a borrowed line is a first guess the bucket soon replaces. A step's
    cost is then (ratio x plain forward + rest) / (plain forward + rest) at its batch size.
    """

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = list(lengths)
        self._plain: dict[int, deque[float]] = {}  # batch size -> plain forward ms
        self._rest: dict[int, deque[float]] = {}  # batch size -> ms of a step outside it
        self._drafted: dict[tuple[int, int], deque[tuple[int, float]]] = {}  # (n, bucket)
        # Medians and lines derived from the samples, until the next record: a decision
        # prices every length, and recomputing them each time cost ~3 ms a step.
        self._derived: dict = {}

    def record(self, n: int, batch_size: int, step_ms: float, forward_ms: float | None) -> None:
        """One decode step: ``step_ms`` from its start to the next step's, ``forward_ms`` of
        it in the worker's forward (None: untimed, the whole step counts)."""
        self._derived.clear()
        forward = step_ms if forward_ms is None else min(forward_ms, step_ms)
        self._rest.setdefault(batch_size, deque(maxlen=COST_WINDOW)).append(step_ms - forward)
        if n == 1:
            self._plain.setdefault(batch_size, deque(maxlen=COST_WINDOW)).append(forward)
        else:
            key = (n, batch_bucket(batch_size))
            self._drafted.setdefault(key, deque(maxlen=COST_WINDOW)).append((batch_size, forward))

    def plain_steps(self, bucket: int) -> int:
        """How many plain steps of batch sizes in ``bucket`` are kept."""
        return sum(len(ms) for b, ms in self._plain.items() if batch_bucket(b) == bucket)

    def measured(self, n: int) -> bool:
        """Whether a step of length ``n`` was measured (in any bucket)."""
        if n == 1:
            return bool(self._plain)
        return any(k == n for k, _ in self._drafted)

    def plain_forward_ms(self, batch_size: int) -> float | None:
        """A plain step's forward, milliseconds, at this batch size (None: none measured)."""
        return self._once(("plain", batch_size), lambda: _median_at(self._plain, batch_size))

    def rest_ms(self, batch_size: int) -> float | None:
        """The part of a step outside the forward, milliseconds, at this batch size."""
        return self._once(("rest", batch_size), lambda: _median_at(self._rest, batch_size))

    def _ratio(self, n: int, bucket: int) -> float | None:
        """The median ratio of length ``n``'s forwards in ``bucket`` to plain forwards."""
        samples = self._drafted.get((n, bucket), ())
        ratios = [ms / plain for b, ms in samples if (plain := self.plain_forward_ms(b))]
        return statistics.median(ratios) if ratios else None

    def _lines(self) -> dict[int, tuple[float, float]]:
        return self._once("lines", self._fit_lines)

    def _once(self, key, compute: Callable[[], object]):
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def _fit_lines(self) -> dict[int, tuple[float, float]]:
        """Per bucket, a drafted forward's ratio to a plain one as a line in the verify
        length, ``(ratio at n = 2, increase per token)``: the draft pass and the verify
        tokens. Fitted to the measured lengths' medians (weighted by their steps), so the
        policy does not chase one length whose few steps happened to run fast (the choice of
        the best of eight noisy costs favours the one most underestimated). A bucket that
        measured one length takes the per-token slope of the nearest bucket that measured
        two or more (flat if none did)."""
        points: dict[int, list[tuple[int, float, int]]] = {}
        for n, k in self._drafted:
            ratio = self._ratio(n, k)
            if ratio is not None:
                points.setdefault(k, []).append((n, ratio, len(self._drafted[(n, k)])))
        arrays = {}  # per bucket: lengths past 2, ratios, steps
        for k, pts in points.items():
            n, r, w = (np.array(v, dtype=float) for v in zip(*pts))
            arrays[k] = (n - 2, r, w)
        slopes = {
            k: max(float(np.polyfit(n, r, 1, w=np.sqrt(w))[0]), 0.0)
            for k, (n, r, w) in arrays.items()
            if len(n) > 1
        }
        lines = {}
        for k, (n, r, w) in arrays.items():
            near = sorted(slopes, key=lambda j: (abs(j - k), j))
            slope = slopes[near[0]] if near else 0.0
            lines[k] = (float(np.average(r - slope * n, weights=w)), slope)
        return lines

    def forward_ratio(self, n: int, batch_size: int) -> float:
        """A forward of length ``n`` over a plain one at this batch size: its bucket's line,
        or the nearest bucket's where its own measured nothing (1.0 before anything was)."""
        lines = self._lines()
        if n == 1 or not lines:
            return 1.0
        bucket = batch_bucket(batch_size)
        at_2, per_token = lines[min(lines, key=lambda k: (abs(k - bucket), k))]
        return max(at_2 + per_token * (n - 2), 1.0)

    def cost(self, n: int, batch_size: int) -> float:
        """Step time of length ``n`` in units of a plain step at this batch size; 1.0 for
        every length before any drafted step was measured."""
        ratio = self.forward_ratio(n, batch_size)
        forward = self.plain_forward_ms(batch_size) or 0.0
        rest = self.rest_ms(batch_size) or 0.0
        if forward + rest <= 0.0:  # nothing timed yet
            return ratio
        return (ratio * forward + rest) / (forward + rest)

    def table(self) -> dict[str, dict[str, float]]:
        """What was measured (for ``/server_info``): per batch size a plain step's forward
        and the rest of a step (ms), and per bucket each length's forward over a plain one."""
        table = {
            "plain_forward_ms": {
                str(b): round(self.plain_forward_ms(b), 3) for b in sorted(self._plain)
            },
            "rest_ms": {str(b): round(self.rest_ms(b), 3) for b in sorted(self._rest)},
        }
        lines = self._lines()
        for k in sorted(lines):
            row = {str(n): self._ratio(n, k) for n in self.lengths[1:]}
            table[f"forward_vs_plain_{k}"] = {
                n: round(r, 3) for n, r in row.items() if r is not None
            }
            at_2, per_token = lines[k]
            table[f"forward_line_{k}"] = {"at_2": round(at_2, 3), "per_token": round(per_token, 4)}
        return table


def _median_at(samples: dict[int, deque[float]], batch_size: int) -> float | None:
    """The median of each batch size's samples, interpolated at ``batch_size``."""
    if not samples:
        return None
    sizes = sorted(samples)
    return float(np.interp(batch_size, sizes, [statistics.median(samples[b]) for b in sizes]))


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
            max_length, self.costs.cost, lengths=lengths if self.adaptive else None
        )
        self.policy.begin(capacity)
        self.clock = clock
        self.chosen: Counter[int] = Counter()
        self._rows: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._explored: Counter[int] = Counter()  # exploration steps taken per bucket
        self._since_plain: Counter[int] = Counter()  # decode steps per bucket since a plain one
        # Measured once per server; the lengths between are interpolated until chosen.
        drafted = self.lengths[1:]
        self._explore_lengths = sorted({drafted[0], drafted[-1]}, reverse=True) if drafted else []
        self._last_step: tuple[int, int, float] | None = None  # (n, batch size, start)
        self._forward_ms: float | None = None  # the last step's forward, where timed
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
            self.costs.record(n, b, 1000.0 * (now - start), self._forward_ms)
        n = self._choose(list(rids))
        self.chosen[n] += 1
        self._last_step = (n, len(rids), now)
        self._forward_ms = None
        self._reports.append((list(rids), n))
        return n

    def forward_done(self) -> None:
        """The worker's forward of the current decode step has finished now (called where
        the forward runs synchronously on the host, i.e. on CPU)."""
        if self._last_step is not None:
            self._forward_ms = 1000.0 * (self.clock() - self._last_step[2])

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
            "step_costs": self.costs.table(),
        }

    # --- internals -------------------------------------------------------------------------

    def _choose(self, rids: list[str]) -> int:
        rows = [self._row(r, rids) for r in rids]
        if not self.adaptive:
            return self.max_length
        bucket = batch_bucket(len(rids))
        n = self._exploration(bucket)
        if n is None and self._since_plain[bucket] >= PLAIN_REFRESH_STEPS:
            n = 1  # the plain reference of a bucket that drafts, refreshed
        if n is None:
            n = self.policy.choose(rows)
        self._since_plain[bucket] = 0 if n == 1 else self._since_plain[bucket] + 1
        return n

    def _exploration(self, bucket: int) -> int | None:
        """The length to measure now, if any: a plain step in a bucket with fewer than
        ``PLAIN_STEPS`` (drafted steps are priced against them), and once per server the
        longest and the shortest drafted length. Tries per bucket are capped: a prefill
        between two decode steps leaves the first unmeasured, and a server that always admits
        requests must not explore on."""
        if self._explored[bucket] >= EXPLORE_TRIES:
            return None
        wanted = [] if self.costs.plain_steps(bucket) >= PLAIN_STEPS else [1]
        wanted += [n for n in self._explore_lengths if not self.costs.measured(n)]
        if not wanted:
            return None
        self._explored[bucket] += 1
        return wanted[0]

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
