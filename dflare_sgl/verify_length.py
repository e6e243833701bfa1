"""How many tokens to verify each step: 1 (plain decoding) up to the draft's block B.

A step that verifies ``n`` tokens, ``[x_last, d_1 .. d_{n-1}]``, commits the accepted drafts
plus one target token and costs ``cost(n, b)`` (:mod:`dflare_sgl.cost_model`). With ``p_k`` the
chance that draft ``k`` is accepted given drafts ``1 .. k-1`` were, a request expects to commit

    E[n] = 1 + sum_{j=1}^{n-1} prod_{k=1}^{j} p_k

tokens, so the batch's committed tokens per unit of time are ``sum_i E_i[n] / cost(n, b)``.
:class:`AdaptiveVerifyLength` picks the ``n`` that maximises it each step. ``n = 1`` is plain
decoding: nothing is drafted, but the engine still writes the draft's context K/V for the
committed token, so drafting can resume at full quality on any later step. The output never
depends on ``n`` (verification is lossless for every length); only the speed does.

One ``n`` for the whole batch: the requests share one target pass over a ``[b, n]`` block,
and HF models have no ragged (varlen) attention, so a request verifying fewer tokens than
its neighbours would still pay for the batch's width. The batch's choice weighs each
request's own acceptance, so a batch of good and bad requests drafts as far as pays for all.

Acceptance model: per request and per draft position, decayed counts of verified and accepted
drafts (``decay`` per observation, so the estimate follows a request whose text turns easy or
hard). A request's estimate leans on the batch-wide one (the same counts over all requests,
decaying more slowly, kept across ``generate`` calls) with ``prior_weight`` pseudo-counts, so a
new request starts from the draft's recent batch-wide record. A position nobody has seen
yet borrows the rate of the position before it.

Measured costs: each step's wall time is compared with the calibrated time of its length and
batch size, and each length's cost is corrected by that (decayed) ratio over the plain steps'
ratio, so a workload whose verify steps cost more than the calibration's (longer, ragged
contexts) drafts less.

Hysteresis and probes: the current ``n`` is kept unless another scores ``hysteresis`` better,
so noise does not make it flap. Positions past the current ``n`` are never verified and so
never learnt; every ``probe_interval`` steps one step verifies the next longer allowed length
(one token more where every length is allowed; at ``n = 1``: one drafted token), the interval
doubling up to ``max_probe_interval`` while probes commit fewer tokens per unit of time than
the current length is expected to, and resetting when one commits more; a probe that commits
more is followed at once by a probe one length longer (a climb), so a draft that has become
good is back at its best length a few steps after the first probe that notices it. A useless
draft so costs one cheap probe every ~100 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class VerifyLengthPolicy(Protocol):
    """The engine asks :meth:`choose` before each step and reports back with :meth:`observe`.

    Requests are the engine's request indices ``0 .. batch_size - 1`` of one ``generate``
    call; :meth:`begin` starts a new call.
    """

    max_length: int

    def begin(self, batch_size: int) -> None: ...

    def choose(self, requests: Sequence[int]) -> int: ...

    def observe(self, requests: Sequence[int], n: int, accept_lens: Sequence[int]) -> None: ...

    def observe_time(self, n: int, batch_size: int, seconds: float) -> None: ...


class FixedVerifyLength:
    """Always ``n`` tokens (``--block-size N``)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"the verify length must be >= 1 (1 = plain decoding), got {n}")
        self.max_length = n

    def begin(self, batch_size: int) -> None:
        pass

    def choose(self, requests: Sequence[int]) -> int:
        return self.max_length

    def observe(self, requests: Sequence[int], n: int, accept_lens: Sequence[int]) -> None:
        pass

    def observe_time(self, n: int, batch_size: int, seconds: float) -> None:
        pass


class CyclingVerifyLength(FixedVerifyLength):
    """``lengths`` in turn, over and over (calibration runs, tests of switching)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        super().__init__(max(lengths))
        self.lengths = list(lengths)
        self.steps = 0

    def begin(self, batch_size: int) -> None:
        self.steps = 0

    def choose(self, requests: Sequence[int]) -> int:
        self.steps += 1
        return self.lengths[(self.steps - 1) % len(self.lengths)]


def expected_committed(rates: np.ndarray) -> np.ndarray:
    """``E[n]`` for ``n = 1 .. B`` from conditional acceptance rates ``rates [..., B-1]``."""
    reach = np.cumprod(rates, axis=-1)  # chance that drafts 1..j are all accepted
    zeros = np.zeros(rates.shape[:-1] + (1,))
    return 1.0 + np.concatenate([zeros, np.cumsum(reach, axis=-1)], axis=-1)


class AdaptiveVerifyLength:
    """Verify the length with the most expected committed tokens per unit of time.

    Args:
      max_length: the longest block (the draft's ``block_size``).
      cost: ``cost(n, b)``, milliseconds of a step verifying ``n`` tokens for ``b`` requests
        (:meth:`dflare_sgl.cost_model.CostModel.step_time`; only ratios matter until
        :meth:`observe_time` compares them with measured times).
      initial_rate: the batch-wide acceptance rate assumed before any step is seen.
      lengths: the lengths it may choose, 1 and ``max_length`` among them (default: every
        length; a subset is for tiers with graphs of their own, which no caller builds yet).
    """

    def __init__(
        self,
        max_length: int,
        cost: Callable[[int, int], float],
        decay: float = 0.9,
        batch_decay: float = 0.98,
        prior_weight: float = 2.0,
        initial_rate: float = 0.5,
        hysteresis: float = 0.05,
        probe_interval: int = 8,
        max_probe_interval: int = 128,
        time_decay: float = 0.95,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.lengths = sorted(set(lengths or range(1, max_length + 1)))
        if self.lengths[0] != 1 or self.lengths[-1] != max_length:
            raise ValueError(f"the lengths must run from 1 to {max_length}, got {self.lengths}")
        self.max_length, self.cost = max_length, cost
        self.decay, self.batch_decay = decay, batch_decay
        self.prior_weight, self.initial_rate = prior_weight, initial_rate
        self.hysteresis = hysteresis
        self.min_probe_interval, self.max_probe_interval = probe_interval, max_probe_interval
        positions = max_length - 1
        self.batch_accepted = np.zeros(positions)
        self.batch_verified = np.zeros(positions)
        self.length: int | None = None  # the current choice, kept across generate calls
        self.probe_interval = probe_interval
        # Measured over predicted step time, per verify length (decayed sums): the real
        # workload's ragged, longer batches may cost more or less than the calibration's.
        self.time_decay = time_decay
        self.time_ratio_sum = np.zeros(max_length)
        self.time_steps = np.zeros(max_length)
        self._since_probe = 0
        self._probe_length: int | None = None  # the length of the probe not yet observed
        self._climb: int | None = None  # the last probe's length, while probes pay
        self.begin(0)

    def begin(self, batch_size: int) -> None:
        self.accepted = np.zeros((batch_size, self.max_length - 1))
        self.verified = np.zeros((batch_size, self.max_length - 1))

    def forget(self, requests: Sequence[int]) -> None:
        """Clear the counts of ``requests``' rows (a server reuses a finished request's row)."""
        rows = list(requests)
        self.accepted[rows] = 0.0
        self.verified[rows] = 0.0

    def grow(self, rows: int) -> None:
        """Add ``rows`` empty rows of counts (a server running more requests than it has rows)."""
        empty = np.zeros((rows, self.max_length - 1))
        self.accepted = np.concatenate([self.accepted, empty])
        self.verified = np.concatenate([self.verified, empty])

    def batch_rates(self) -> np.ndarray:
        """Batch-wide acceptance rate of each position ``[B-1]``."""
        rates = np.empty(self.max_length - 1)
        prior, w = self.initial_rate, self.prior_weight
        for k in range(rates.size):
            rates[k] = (self.batch_accepted[k] + w * prior) / (self.batch_verified[k] + w)
            prior = rates[k]
        return rates

    def rates(self, requests: Sequence[int]) -> np.ndarray:
        """Each request's acceptance rate by position ``[len(requests), B-1]``."""
        rows, w = list(requests), self.prior_weight
        return (self.accepted[rows] + w * self.batch_rates()) / (self.verified[rows] + w)

    def scores(self, requests: Sequence[int]) -> np.ndarray:
        """Expected committed tokens per unit of step time for ``n = 1 .. B`` ``[B]`` (0 for
        a length it may not choose)."""
        expected = expected_committed(self.rates(requests)).sum(axis=0)
        return expected / self.step_costs(len(requests))

    def step_costs(self, batch_size: int) -> np.ndarray:
        """Each length's cost at this batch size, corrected by the measured times ``[B]``
        (infinite for a length it may not choose)."""
        costs = np.full(self.max_length, np.inf)
        for n in self.lengths:
            costs[n - 1] = self.cost(n, batch_size)
        return costs * self.time_corrections()

    def time_corrections(self) -> np.ndarray:
        """Measured over predicted time of each verify length ``[B]`` (1 where unmeasured),
        relative to plain steps'."""
        w = self.prior_weight
        ratio = (self.time_ratio_sum + w) / (self.time_steps + w)
        return ratio / ratio[0]

    def observe_time(self, n: int, batch_size: int, seconds: float) -> None:
        """Record a step's wall time: each length's cost is corrected by how much longer or
        shorter than predicted its steps really take, compared with plain steps. A length not
        measured yet keeps its calibrated cost; so while only drafted steps run and turn out
        slow, drafting looks dearer, the policy tries plain steps, and their times then set
        the comparison right."""
        predicted = self.cost(n, batch_size)
        if predicted <= 0 or seconds <= 0:
            return
        k = n - 1
        # Clipped: one step that paid for a one-time cost (a cache growing, the OS) must not
        # price its length out for good.
        ratio = min(max(1000.0 * seconds / predicted, 0.5), 2.0)
        self.time_ratio_sum[k] = self.time_decay * self.time_ratio_sum[k] + ratio
        self.time_steps[k] = self.time_decay * self.time_steps[k] + 1

    def choose(self, requests: Sequence[int]) -> int:
        scores = self.scores(requests)
        best = int(scores.argmax()) + 1
        current = self.length
        if current is None or scores[best - 1] > scores[current - 1] * (1 + self.hysteresis):
            current = best
        self.length = current
        self._since_probe += 1
        below = max(current, self._climb or 1)  # probes climb from the last one that paid
        if below < self.max_length and self._since_probe >= self.probe_interval:
            self._since_probe = 0
            self._probe_length = self.lengths[self.lengths.index(below) + 1]
            return self._probe_length
        return current

    def _probe_paid(self, requests: list[int], n: int, accepted: np.ndarray) -> bool:
        """Did the probe commit more tokens per unit of time than the current length expects
        to? (Not "was a draft accepted somewhere": in a large batch some request nearly always
        accepts a mediocre draft, and probing every few steps would then cost more than it
        finds.) Judged before the probe's counts are added, against the estimate it tests."""
        current = self.length or 1
        costs = self.step_costs(len(requests))
        committed = 1.0 + np.minimum(accepted, n - 1).mean()
        expected = expected_committed(self.rates(requests))[:, current - 1].mean()
        return bool(committed / costs[n - 1] > expected / costs[current - 1])

    def observe(self, requests: Sequence[int], n: int, accept_lens: Sequence[int]) -> None:
        """Record a step that verified ``n`` tokens: request ``requests[r]`` had its first
        ``accept_lens[r]`` drafts accepted (before any stop or budget cut)."""
        a = np.asarray(accept_lens, dtype=np.int64)[:, None]
        # The probe's own step (a server reports steps late, after later choices).
        if n == self._probe_length and len(requests):
            self._probe_length = None
            paid = self._probe_paid(list(requests), n, a[:, 0])
            self.probe_interval = (
                self.min_probe_interval
                if paid
                else min(2 * self.probe_interval, self.max_probe_interval)
            )
            # One that paid is followed at once by one a length longer: each teaches the
            # next position, which the current estimate has never seen (it borrows the rate
            # before it), so a draft that has turned good is climbed back to in a few steps
            # rather than one position per probe interval. One that did not pay ends it.
            self._climb = n if paid and n < self.max_length else None
            if self._climb is not None:
                self._since_probe = self.probe_interval
        if n < 2 or not len(requests):
            return
        rows = list(requests)
        k = np.arange(self.max_length - 1)[None, :]
        # Drafts 1..a were accepted, draft a+1 (if verified) was not, later ones were unseen.
        seen = k < np.minimum(a + 1, n - 1)
        hit = k < a
        self.accepted[rows] = np.where(seen, self.decay * self.accepted[rows] + hit, self.accepted[rows])
        self.verified[rows] = np.where(seen, self.decay * self.verified[rows] + 1, self.verified[rows])
        any_seen = seen.any(axis=0)
        self.batch_accepted = np.where(
            any_seen, self.batch_decay * self.batch_accepted + hit.sum(axis=0), self.batch_accepted
        )
        self.batch_verified = np.where(
            any_seen, self.batch_decay * self.batch_verified + seen.sum(axis=0), self.batch_verified
        )
