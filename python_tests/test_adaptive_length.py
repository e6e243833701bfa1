"""The verify length of each DFLARE decode step inside SGLang (``sglang_plugin.adaptive_length``):
the request rows, the costs measured from step times, the first steps' exploration, the late
acceptance reports, on synthetic steps driven by a fake clock. (The worker running it inside
the real engine is tested in test_sglang_engine.py.)"""

from __future__ import annotations

import pytest

from dflare_sgl.sglang_plugin.adaptive_length import (
    COST_WINDOW,
    EXPLORE_TRIES,
    PLAIN_REFRESH_STEPS,
    PLAIN_STEPS,
    MeasuredStepCosts,
    ServerVerifyLength,
    batch_bucket,
)
from dflare_sgl.verify_length import AdaptiveVerifyLength

B = 8
REST_MS = 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _serve(lengths, steps, accept, step_ms, rids=("a",), server=None, late=False):
    """Run ``steps`` decode steps of ``rids``; each step's forward takes ``step_ms(n, b)``,
    then 1 ms of other work, and accepts ``accept(step, n)`` drafts per request, reported at
    once or (``late``, as under SGLang's overlap scheduler) after the next step was chosen.
    Returns (server, chosen lengths)."""
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
        server.forward_done()
        clock.now += REST_MS / 1000.0
    return server, chosen


def cpu_like_ms(n: int, b: int) -> float:
    return 30.0 * b**0.5 * (1.0 + 0.12 * (n - 1))


def test_batch_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 7, 8, 48)] == [1, 2, 2, 4, 4, 8, 32]


def test_costs_are_ratios_to_plain_steps_of_the_same_batch_size():
    """Steps timed whole (as on a GPU, where the forward is not timed on the host)."""
    costs = MeasuredStepCosts(range(1, B + 1))
    assert costs.cost(3, 1) == 1.0 and costs.plain_forward_ms(1) is None  # nothing measured
    for ms in (10.0, 11.0, 500.0):  # one stalled step does not move the median
        costs.record(1, 1, ms, None)
    costs.record(1, 3, 30.0, None)
    assert costs.plain_forward_ms(1) == 11.0 and costs.plain_forward_ms(2) == pytest.approx(20.5)
    assert costs.rest_ms(2) == 0.0
    # A bucket mixing batch sizes: each drafted step is priced against its own size's plain
    # step (2 x 11 ms at b=2 and 2 x 30 ms at b=3 are both twice a plain step).
    costs.record(5, 2, 41.0, None)
    costs.record(5, 3, 60.0, None)
    costs.record(5, 3, 60.0, None)
    assert costs.cost(5, 3) == pytest.approx(2.0) and costs.cost(1, 3) == 1.0
    assert costs.cost(3, 2) == costs.cost(8, 2) == pytest.approx(2.0)  # one length: flat
    # Two lengths: the bucket's lengths lie on the line through them.
    costs.record(2, 2, 1.5 * 20.5, None)
    assert costs.cost(3, 2) == pytest.approx(1.5 + 1 / 6) and costs.cost(8, 2) == pytest.approx(2.5)
    # Another bucket borrows the nearest bucket's line until it measures its own; one that
    # measured a single length takes the nearest slope through it.
    assert costs.cost(5, 16) == pytest.approx(2.0)
    costs.record(1, 16, 100.0, None)
    costs.record(5, 16, 300.0, None)
    assert costs.cost(5, 16) == pytest.approx(3.0) and costs.cost(2, 16) == pytest.approx(2.5)
    assert costs.cost(5, 2) == pytest.approx(2.0)
    for ms in range(COST_WINDOW + 5):  # only the last COST_WINDOW steps count
        costs.record(1, 16, 200.0 + ms, None)
    assert costs.plain_forward_ms(16) == 200.0 + 5 + COST_WINDOW // 2
    table = costs.table()
    assert table["plain_forward_ms"] == {"1": 11.0, "3": 30.0, "16": 207.0}
    assert table["rest_ms"] == {"1": 0.0, "2": 0.0, "3": 0.0, "16": 0.0}
    assert table["forward_vs_plain_2"] == {"2": 1.5, "5": 2.0}
    assert table["forward_line_2"] == {"at_2": 1.5, "per_token": 0.1667}
    assert table["forward_vs_plain_16"] == {"5": 1.449}
    assert table["forward_line_16"] == {"at_2": 0.949, "per_token": 0.1667}


def test_a_length_that_ran_fast_once_does_not_win():
    """Eight lengths' costs, each the median of a few noisy steps: the best-looking one is
    the most underestimated. A line through all of them is not moved much by one."""
    costs = MeasuredStepCosts(range(1, B + 1))
    costs.record(1, 1, 100.0, None)
    for _ in range(COST_WINDOW):
        costs.record(2, 1, 160.0, None)
        costs.record(B, 1, 250.0, None)
    costs.record(4, 1, 130.0, None)  # one step, as fast as a 1.3x
    assert 1.6 < costs.cost(3, 1) < costs.cost(4, 1) < costs.cost(5, 1) < 2.5
    assert costs.cost(4, 1) > 1.75


def test_the_rest_of_a_step_is_shared_by_every_length():
    """Under the overlap loop a step's interval holds the previous step's result work. Timed
    whole, plain steps after drafted ones look slow and drafting looks cheap; the forward
    timed apart prices each length by its own work plus the rest all lengths pay."""
    whole, split = MeasuredStepCosts(range(1, B + 1)), MeasuredStepCosts(range(1, B + 1))
    forward = {1: 60.0, 4: 120.0}
    left_by = {1: 20.0, 4: 50.0}  # result work a step leaves to the next interval
    previous = 1
    for n in [1, 4] * 3:  # alternating, as where drafting pays about as much as it costs
        step = forward[n] + left_by[previous]
        whole.record(n, 1, step, None)
        split.record(n, 1, step, forward[n])
        previous = n
    assert whole.cost(4, 1) == pytest.approx(140.0 / 110.0)  # 120 + 20 over 60 + 50
    rest = split.rest_ms(1)
    assert rest == 20.0  # the median of 20, 50, 20, 50, 20 (the window's last five)
    assert split.cost(4, 1) == pytest.approx((120.0 + rest) / (60.0 + rest))
    assert split.forward_ratio(4, 1) == 2.0 and split.forward_ratio(1, 1) == 1.0
    # A forward longer than its interval (clock jitter) leaves no negative rest.
    split.record(1, 2, 10.0, 12.0)
    assert split.rest_ms(2) == 0.0 and split.plain_forward_ms(2) == 10.0


def test_first_steps_measure_plain_then_the_longest_and_shortest_draft():
    server, chosen = _serve(range(1, B + 1), 40, lambda s, n: n - 1, cpu_like_ms)
    assert chosen[: PLAIN_STEPS + 2] == [1] * PLAIN_STEPS + [B, 2]
    # An always-right draft then verifies the whole block.
    assert chosen[PLAIN_STEPS + 5 :] == [B] * (40 - PLAIN_STEPS - 5)
    # Each step's time was recorded for its own length, as a ratio to the plain step.
    assert server.costs.plain_forward_ms(1) == pytest.approx(cpu_like_ms(1, 1))
    assert server.costs.rest_ms(1) == pytest.approx(REST_MS)
    for n in (2, B):
        step = cpu_like_ms(n, 1) + REST_MS
        assert server.costs.cost(n, 1) == pytest.approx(step / (cpu_like_ms(1, 1) + REST_MS))
    # A new batch-size bucket measures its plain steps, then borrows the drafted ratios.
    _, chosen = _serve(range(1, B + 1), 5, lambda s, n: n - 1, cpu_like_ms, "abcd", server)
    assert chosen == [1] * PLAIN_STEPS + [B, B]


def test_a_slow_first_plain_step_does_not_make_drafting_look_free():
    """A server's first plain step can run twice as slow as the rest (warm-up): the plain
    reference is the median of several, so a drafted step is still priced against ~70 ms."""
    first = [True]

    def step_ms(n, b):
        if n == 1 and first[0]:
            first[0] = False
            return 160.0
        return 70.0 if n == 1 else 90.0

    server, _ = _serve(range(1, B + 1), 12, lambda s, n: 0, step_ms)
    assert server.costs.plain_forward_ms(1) == pytest.approx(70.0)
    assert server.costs.cost(2, 1) == pytest.approx(91.0 / 71.0)


def test_a_drafting_server_refreshes_its_plain_reference():
    """While every step drafts, one in PLAIN_REFRESH_STEPS per bucket is plain, so plain
    steps that got slower (or faster) since the server's start are seen; a bucket that is
    plain anyway takes no extra steps."""
    slow = [False]

    def step_ms(n, b):
        return (140.0 if slow[0] else 70.0) if n == 1 else 80.0

    server, chosen = _serve(range(1, B + 1), 200, lambda s, n: n - 1, step_ms)
    drafting = chosen[PLAIN_STEPS + 2 :]
    assert drafting.count(1) == len(drafting) // (PLAIN_REFRESH_STEPS + 1)
    slow[0] = True  # plain steps now cost more: drafting is cheaper than it looked
    server, _ = _serve(range(1, B + 1), 6 * PLAIN_REFRESH_STEPS, lambda s, n: n - 1, step_ms,
                       server=server)  # fmt: skip
    assert server.costs.plain_forward_ms(1) == pytest.approx(140.0)
    _, chosen = _serve(range(1, B + 1), 300, lambda s, n: 0, cpu_like_ms)
    assert set(chosen[10:]) == {1, 2}  # a useless draft: plain steps and rare probes only


def test_exploration_tries_are_capped():
    """A prefill between every two decode steps leaves no decode step measured: the server
    stops exploring after EXPLORE_TRIES steps instead of running plain steps for ever."""
    clock = FakeClock()
    server = ServerVerifyLength(B, range(1, B + 1), capacity=4, clock=clock)
    chosen = []
    for _ in range(EXPLORE_TRIES + 5):
        chosen.append(server.begin_decode(["a"]))
        server.verified([chosen[-1] - 1], 1)
        clock.now += 0.01
        server.other_forward()
    assert chosen[:EXPLORE_TRIES] == [1] * EXPLORE_TRIES
    assert chosen[EXPLORE_TRIES:] == [B] * 5  # nothing measured: every length costs alike


@pytest.mark.parametrize("late", [False, True])
def test_a_useless_draft_is_turned_off_and_probed(late):
    steps = 300
    server, chosen = _serve(range(1, B + 1), steps, lambda s, n: 0, cpu_like_ms, late=late)
    after = chosen[10:]
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
    for _ in range(PLAIN_STEPS):  # plain steps measured: the next two steps draft
        server.costs.record(1, 2, 10.0, 9.0)
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
