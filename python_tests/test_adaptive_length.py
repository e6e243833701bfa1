"""The verify length of each DFLARE decode step inside SGLang (``sglang_plugin.adaptive_length``):
the request rows, the costs measured from step times, the first steps' exploration, the late
acceptance reports, on synthetic steps driven by a fake clock. (The worker running it inside
the real engine is tested in test_sglang_engine.py.)"""

from __future__ import annotations

import pytest

from dflare_sgl.sglang_plugin.adaptive_length import (
    COST_WINDOW,
    EXPLORE_ROUNDS,
    MeasuredStepCosts,
    ServerVerifyLength,
    batch_bucket,
)
from dflare_sgl.verify_length import AdaptiveVerifyLength

B = 8


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _serve(lengths, steps, accept, step_ms, rids=("a",), server=None, late=False):
    """Run ``steps`` decode steps of ``rids``; each step takes ``step_ms(n, b)`` and accepts
    ``accept(step, n)`` drafts per request, reported at once or (``late``, as under SGLang's
    overlap scheduler) after the next step was chosen. Returns (server, chosen lengths)."""
    clock = FakeClock()
    server = server or ServerVerifyLength(B, lengths, capacity=8, clock=clock)
    server.clock = clock
    chosen, unreported = [], []
    for step in range(steps):
        n = server.begin_decode(list(rids))
        chosen.append(n)
        unreported.append([accept(step, n)] * len(rids))
        while len(unreported) > int(late):
            server.verified(unreported.pop(0), len(rids))
        clock.now += step_ms(n, len(rids)) / 1000.0
    return server, chosen


def cpu_like_ms(n: int, b: int) -> float:
    return 30.0 * b**0.5 * (1.0 + 0.12 * (n - 1))


def test_batch_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 7, 8, 48)] == [1, 2, 2, 4, 4, 8, 32]


def test_measured_costs_median_and_interpolation():
    costs = MeasuredStepCosts(range(1, B + 1))
    assert costs.step_ms(3, 1) == 1.0  # nothing measured: every length alike
    for ms in (10.0, 11.0, 500.0):  # one stalled step does not move the median
        costs.record(1, 1, ms)
    for ms in (20.0, 20.0, 20.0):
        costs.record(5, 1, ms)
    assert costs.step_ms(1, 1) == 11.0
    assert costs.step_ms(3, 1) == pytest.approx(15.5)  # halfway from 11 to 20
    assert costs.step_ms(8, 1) == 20.0  # flat past the last measured length
    assert costs.step_ms(1, 3) == 11.0  # an unmeasured bucket borrows the nearest
    for ms in range(COST_WINDOW + 5):  # only the last COST_WINDOW steps count
        costs.record(1, 1, 100.0 + ms)
    assert costs.step_ms(1, 1) == 100.0 + 5 + COST_WINDOW // 2
    assert costs.table()["1"] == {"1": 107.0, "5": 20.0}


def test_first_steps_of_a_bucket_try_every_length_longest_first():
    server, chosen = _serve(range(1, B + 1), 40, lambda s, n: n - 1, cpu_like_ms)
    explore = EXPLORE_ROUNDS * B
    assert chosen[:explore] == list(range(B, 0, -1)) * EXPLORE_ROUNDS
    # An always-right draft then verifies the whole block.
    assert chosen[explore + 3 :] == [B] * (40 - explore - 3)
    # Each step's time was recorded for its own length.
    assert server.costs.step_ms(1, 1) == pytest.approx(cpu_like_ms(1, 1))
    assert server.costs.step_ms(B, 1) == pytest.approx(cpu_like_ms(B, 1))
    # A new batch-size bucket explores again.
    _, chosen = _serve(range(1, B + 1), 3, lambda s, n: n - 1, cpu_like_ms, "abcd", server)
    assert chosen == [B, B - 1, B - 2]


@pytest.mark.parametrize("late", [False, True])
def test_a_useless_draft_is_turned_off_and_probed(late):
    steps = 300
    server, chosen = _serve(range(1, B + 1), steps, lambda s, n: 0, cpu_like_ms, late=late)
    after = chosen[EXPLORE_ROUNDS * B + 10 :]
    assert set(after) == {1, 2}  # probes verify one draft now and then
    # ... ever more rarely while they fail (each probe judged by its own step's report).
    assert after.count(2) <= 8 and server.policy.probe_interval == 128


def test_gpu_tiers_only():
    tiers = [1, 2, 4, B]
    _, chosen = _serve(tiers, 60, lambda s, n: n - 1, lambda n, b: 10.0 + 0.1 * n)
    assert set(chosen) <= set(tiers) and chosen[-1] == B
    _, chosen = _serve(tiers, 200, lambda s, n: 0, lambda n, b: 10.0 + 1.0 * n)
    assert set(chosen[20:]) <= {1, 2}
    with pytest.raises(ValueError, match="from 1 to 8"):
        AdaptiveVerifyLength(B, lambda n, b: 1.0, lengths=[2, 4, B])


def test_fixed_length_keeps_the_histogram():
    server, chosen = _serve(None, 12, lambda s, n: 1, cpu_like_ms, "ab")
    assert chosen == [B] * 12
    report = server.report()
    assert not report["adaptive"] and report["steps_by_length"] == {str(B): 12}
    assert report["decode_steps"] == 12


def test_late_reports_and_finished_requests():
    clock = FakeClock()
    server = ServerVerifyLength(B, range(1, B + 1), capacity=4, clock=clock)
    # Overlap scheduling: step t's counts arrive after step t+1 was decided.
    first = server.begin_decode(["a", "b"])
    second = server.begin_decode(["a", "b"])
    server.verified([first - 1, 0], 2)
    server.verified([second - 1, 0], 2)
    policy = server.policy
    row_a, row_b = server._rows["a"], server._rows["b"]
    assert policy.accepted[row_a, 0] > 0 and policy.accepted[row_b, 0] == 0
    # A report out of step with the decided steps (another batch size) is dropped.
    server.begin_decode(["a"])
    server.verified([0, 0, 0], 3)
    assert not server._reports
    # A finished request's row is cleared for the next one.
    server.finished("a")
    server.begin_decode(["c"])
    assert server._rows["c"] == row_a and policy.verified[row_a].sum() == 0
    # Rows of requests that vanished unreported (aborts) are reclaimed when rows run out.
    server.begin_decode(["d", "e"])
    server.begin_decode(["f", "g", "h"])
    assert set(server._rows) == {"f", "g", "h"}
    # More requests running than rows: the rows grow.
    running = [f"r{i}" for i in range(6)]
    server.begin_decode(running)
    assert set(server._rows) == set(running) and server.capacity == 8
    assert len(set(server._rows.values())) == 6 and policy.accepted.shape[0] == 8
