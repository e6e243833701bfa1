"""The verify length chosen each step: the policy on synthetic acceptance and costs, the cost
model files, and losslessness of the engine whatever lengths it is made to verify.

Engine tests run the real SmolLM2 target in float32 with real (random or oracle) drafts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle_draft import OracleDecoder
from test_engine import _draft, _target_only_sample
from test_engine import greedy_reference, prompts, target  # noqa: F401  (fixtures)

from dflare_sgl.cli import main
from dflare_sgl.cost_model import (
    CostModel,
    calibrate,
    decoder_key,
    default_lengths,
    load_or_calibrate,
)
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder, verify_length_counts
from dflare_sgl.verify_length import (
    AdaptiveVerifyLength,
    CyclingVerifyLength,
    FixedVerifyLength,
    expected_committed,
)

B = 8


def cpu_like_cost(n: int, b: int) -> float:
    """A verify pass that grows with n, as on CPU: +12% a token."""
    return 1.0 + 0.12 * (n - 1)


def _run(policy, accept, steps: int, batch: int = 1) -> list[int]:
    """Drive ``policy`` for ``steps`` steps; ``accept(step, n)`` gives each request's accepted
    drafts. Returns the chosen lengths."""
    policy.begin(batch)
    chosen = []
    for step in range(steps):
        n = policy.choose(range(batch))
        chosen.append(n)
        policy.observe(range(batch), n, [accept(step, n) for _ in range(batch)])
    return chosen


def geometric_acceptance(rate: float, seed: int):
    """``accept(step, n)`` for a draft whose every position is right with chance ``rate``."""
    rng = np.random.default_rng(seed)

    def accept(step, n):
        a = 0
        while a < n - 1 and rng.random() < rate:
            a += 1
        return a

    return accept


def test_expected_committed_by_hand():
    rates = np.array([0.5, 0.5, 1.0])
    assert expected_committed(rates).tolist() == [1.0, 1.5, 1.75, 2.0]
    assert expected_committed(np.zeros((2, 3)))[0].tolist() == [1.0] * 4


def test_always_right_drives_n_to_the_block():
    chosen = _run(AdaptiveVerifyLength(B, cpu_like_cost), lambda s, n: n - 1, 40)
    assert chosen[-10:] == [B] * 10


def test_never_right_drives_n_to_one_and_still_probes():
    policy = AdaptiveVerifyLength(B, cpu_like_cost)
    chosen = _run(policy, lambda s, n: 0, 600)
    assert chosen.index(1) <= 6, chosen[:20]
    probes = [s for s, n in enumerate(chosen) if s >= 10 and n > 1]
    assert probes, "the policy must still try drafting now and then"
    assert len(probes) <= 0.03 * 590, "probing a useless draft must stay rare"
    assert all(chosen[s] == 2 for s in probes), "a probe at n = 1 drafts one token"
    assert policy.probe_interval == policy.max_probe_interval


def test_a_mediocre_draft_in_a_large_batch_is_probed_rarely():
    """Drafts right 30% of the time where a drafted step costs 1.6x a plain one: in a batch of
    16 some request accepts nearly every probe, but probes commit fewer tokens per unit of time
    than plain steps, so they grow rare (the rule "accepted somewhere" kept them at 1 in 8)."""
    policy = AdaptiveVerifyLength(B, lambda n, b: 1.0 if n == 1 else 1.6 + 0.1 * (n - 2))
    chosen = _run(policy, geometric_acceptance(0.3, seed=2), 600, batch=16)
    probes = [s for s, n in enumerate(chosen) if s >= 50 and n > 1]
    assert len(probes) <= 0.03 * 550, len(probes)
    assert policy.probe_interval == policy.max_probe_interval


def test_a_draft_that_turns_good_is_noticed():
    """Probes have grown rare (one in max_probe_interval) while the draft was useless; the
    first one after it turns good pays, and the probes that follow at once, each one token
    longer, climb back to the block (one position per probe interval took 200+ steps)."""
    policy = AdaptiveVerifyLength(B, cpu_like_cost)
    chosen = _run(policy, lambda s, n: 0 if s < 300 else n - 1, 700)
    assert chosen[280:300] == [1] * 20 or max(chosen[280:300]) <= 2
    first = next(s for s in range(300, 700) if chosen[s] > 1)
    assert first - 300 <= policy.max_probe_interval
    back = next(s for s in range(300, 700) if chosen[s] == B)
    assert back - first <= B, f"back at the full block {back - first} steps after a probe paid"
    assert chosen[-20:] == [B] * 20


def test_costs_growing_with_batch_lower_n():
    """Acceptance 0.7 a position; a verify token costs 2% of a decode at b = 1, 40% at b = 16."""

    def cost(n: int, b: int) -> float:
        return 1.0 + (n - 1) * 0.025 * b

    accept = geometric_acceptance(0.7, seed=0)
    ns = {}
    for b in (1, 4, 16):
        chosen = _run(AdaptiveVerifyLength(B, cost), accept, 200, batch=b)
        ns[b] = np.median(chosen[100:])
    assert ns[1] > ns[4] > ns[16] >= 1, ns


def test_hysteresis_keeps_n_steady_under_noise():
    """Acceptance 0.35 a position makes n = 2 and n = 3 nearly equal under this cost."""

    def switches(hysteresis: float) -> int:
        accept = geometric_acceptance(0.35, seed=1)
        policy = AdaptiveVerifyLength(B, lambda n, b: 1.0 + 0.2 * (n - 1), hysteresis=hysteresis)
        policy.max_probe_interval = 10**9  # count only the policy's own switches
        chosen = _run(policy, accept, 600)
        return sum(a != b for a, b in zip(chosen[50:], chosen[51:]))

    steady, flappy = switches(0.05), switches(0.0)
    assert steady < flappy and steady <= 0.05 * 550, (steady, flappy)


def test_measured_step_times_correct_the_costs():
    """The calibration says a drafted step is almost free, the steps themselves take 2x a
    plain one: the policy follows the measured times and stops drafting."""
    calibrated = lambda n, b: 30.0 * (1.0 + 0.05 * (n - 1))  # noqa: E731  (ms)

    def run(measure: bool) -> list[int]:
        policy, accept = AdaptiveVerifyLength(B, calibrated), geometric_acceptance(0.3, seed=2)
        policy.begin(1)
        chosen = []
        for step in range(300):
            n = policy.choose([0])
            chosen.append(n)
            policy.observe([0], n, [accept(step, n)])
            if measure:  # seconds: 30 ms a plain step, 60 ms + 3 ms a token with a draft
                policy.observe_time(n, 1, 0.030 if n == 1 else 0.060 + 0.003 * n)
        return chosen[100:]

    assert np.median(run(measure=False)) >= 2
    corrected = run(measure=True)
    assert corrected.count(1) >= 0.9 * len(corrected), corrected


def test_fixed_length():
    with pytest.raises(ValueError, match=">= 1"):
        FixedVerifyLength(0)
    assert FixedVerifyLength(3).choose([0, 1]) == 3


# -- cost model files -------------------------------------------------------------------------


def _model(**overrides) -> CostModel:
    fields = dict(
        key={"device": "cpu:test", "target": "t", "draft": "d", "dtype": "float32",
             "threads": 2, "kernel": "torch"},
        batch_sizes=(1, 4),
        lengths=(1, 2, 4),
        step_ms=((10.0, 20.0), (11.0, 26.0), (14.0, 40.0)),
    )
    fields.update(overrides)
    return CostModel(**fields)


def test_cost_model_interpolates():
    m = _model()
    assert m.relative(1, 3) == 1.0
    assert m.step_time(2, 1) == 11.0 and m.step_time(3, 1) == 12.5
    assert m.step_time(2, 2.5) == pytest.approx(18.5)
    assert m.step_time(4, 64) == 40.0  # past the grid: its edge
    assert default_lengths(16) == (1, 2, 3, 4, 8, 16) and default_lengths(6) == (1, 2, 3, 4, 6)


def test_cost_model_file_round_trip_and_refusals(tmp_path):
    m = _model()
    path = m.save(tmp_path / "costs.json")
    assert CostModel.load(path, expect_key=m.key) == m
    assert json.loads(path.read_text())["lengths"] == [1, 2, 4]
    other = dict(m.key, device="cuda:H100")
    with pytest.raises(ValueError, match="another setting.*device 'cpu:test' != 'cuda:H100'"):
        CostModel.load(path, expect_key=other)
    for text, why in [
        ("{not json", "malformed"),
        ('{"format": "x"}', "malformed.*not a dflare-cost-model"),
        (json.dumps(json.loads(m.to_json()) | {"lengths": [2, 4, 8]}), "start at 1"),
        (json.dumps(json.loads(m.to_json()) | {"step_ms": [[1, 2]]}), "rows"),
        (json.dumps(json.loads(m.to_json()) | {"step_ms": [[1, 2], [1, -2], [3, 4]]}), "positive"),
    ]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=why):
            CostModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        CostModel.load(tmp_path / "missing.json")


def test_calibration_is_cached(tmp_path):
    calls = []

    def measure(lengths, b):
        calls.append(b)
        return {n: 10.0 * b + n for n in lengths}

    k = _model().key
    first = load_or_calibrate(k, measure, (1, 2, 3), (1, 2), cache_dir=tmp_path)
    assert calls == [1, 2] and first.step_time(3, 2) == 23.0
    again = load_or_calibrate(k, measure, (1, 2, 3), (1, 2), cache_dir=tmp_path)
    assert again == first and calls == [1, 2]
    assert calibrate(measure, k, (1, 2), (1,), progress=False).lengths == (1, 2)
    assert load_or_calibrate(k, measure, (1, 2, 3), (1, 2), tmp_path, use_cache=False) == first
    assert calls == [1, 2, 1, 1, 2]


# -- the engine --------------------------------------------------------------------------------


SCHEDULE = [1, 1, 1, 4, 8, 1, 2, 8, 8, 3, 1, 5, 1, 1, 8, 2]


@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_lossless_under_switching(target, prompts, greedy_reference, batch_size):
    model, tok = target
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(tok.eos_token_id,))
    for draft, error_rate in [(_draft(model, "layerwise", 1, block_size=B), None), (None, 0.3)]:
        if error_rate is None:
            decoder = SpeculativeDecoder(model, draft, block_size=B)
        else:  # an oracle draft, so long accepted runs happen under the switching too
            decoder = OracleDecoder(model, _draft(model, "layerwise", 1, block_size=B),
                                    block_size=B, error_rate=error_rate)
        for start in range(0, 8, batch_size):
            batch = prompts[start : start + batch_size]
            if error_rate is not None:
                decoder.set_references(batch, greedy_reference[start : start + batch_size])
            results = decoder.generate(batch, params, verify_length=CyclingVerifyLength(SCHEDULE))
            for j, r in enumerate(results):
                assert r.tokens == greedy_reference[start + j], (start + j, r.verify_lengths)
                assert set(r.verify_lengths) > {1}
            if error_rate is not None:
                assert max(max(r.accept_lengths) for r in results) >= 4


def test_sampling_lossless_under_switching(target, prompts):
    model, tok = target
    decoder = SpeculativeDecoder(model, _draft(model, "layerwise", 2, block_size=B), block_size=B)
    batch = prompts[:3]
    plist = [
        SamplingParams(24, 0.8, 20, 0.9, seed=5 + i, stop_token_ids=(tok.eos_token_id,))
        for i in range(len(batch))
    ]
    results = decoder.generate(batch, plist, verify_length=CyclingVerifyLength([3, 1, 8, 1, 1, 2]))
    for ids, p, r in zip(batch, plist, results):
        assert r.tokens == _target_only_sample(model, ids, 24, p)


def test_adaptive_engine_calibrates_once_and_stays_lossless(
    target, prompts, greedy_reference, tmp_path, monkeypatch
):
    model, tok = target
    monkeypatch.setenv("DFLARE_CACHE", str(tmp_path))
    draft = _draft(model, "layerwise", 1, block_size=4)
    decoder = OracleDecoder(model, draft, error_rate=0.1)
    assert decoder.adaptive and decoder.block_size == 4
    decoder.calibrate(batch_sizes=(1, 2))
    files = list((tmp_path / "cost_models").glob("*.json"))
    assert len(files) == 1
    cm = CostModel.load(files[0], expect_key=decoder_key(decoder))
    assert cm.lengths == (1, 2, 3, 4) and cm.batch_sizes == (1, 2)
    assert cm.key["threads"] == torch.get_num_threads() and cm.key["kernel"] == "torch"
    stamp = files[0].stat().st_mtime_ns
    SpeculativeDecoder(model, draft).calibrate(batch_sizes=(1, 2))  # read from the cache
    assert files[0].stat().st_mtime_ns == stamp

    params = SamplingParams(max_new_tokens=24, stop_token_ids=(tok.eos_token_id,))
    batch, ref = prompts[:2], greedy_reference[:2]
    decoder.set_references(batch, ref)
    results = decoder.generate(batch, params)
    assert [r.tokens for r in results] == ref
    counts = verify_length_counts(results)
    assert sum(counts.values()) == sum(len(r.verify_lengths) for r in results)
    assert max(counts) > 1, "a 90%-right draft should be drafted with"

    with pytest.raises(ValueError, match="another setting"):
        decoder.set_cost_model(_model())
    with pytest.raises(ValueError, match="exceeds block_size"):
        decoder.generate(batch, params, verify_length=FixedVerifyLength(5))


def test_plain_decoding_and_block_size_one(target, prompts, greedy_reference):
    """n = 1 throughout is plain decoding: no draft tokens, the target's output."""
    model, tok = target
    decoder = SpeculativeDecoder(model, _draft(model, "layerwise", 1), block_size=1)
    results = decoder.generate(prompts[:2], SamplingParams(24, stop_token_ids=(tok.eos_token_id,)))
    assert [r.tokens for r in results] == greedy_reference[:2]
    assert all(r.num_drafted == 0 and set(r.verify_lengths) == {1} for r in results)


def test_cli_cost_model_errors(tmp_path, capsys, smollm2_dir):
    bad = tmp_path / "costs.json"
    bad.write_text("[]")
    args = ["generate", "--target", str(smollm2_dir), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert main(args + ["--cost-model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("dflare: error: cost model") and "malformed" in err
    assert main(args + ["--cost-model", str(bad), "--block-size", "2"]) == 2
    assert "drop it or --block-size" in capsys.readouterr().err
    other = _model()
    other.save(bad)
    assert main(args + ["--cost-model", str(bad)]) == 2
    assert "calibrated for another setting" in capsys.readouterr().err


def test_cli_calibrate_writes_a_readable_file(tmp_path, capsys, smollm2_dir, monkeypatch):
    monkeypatch.setenv("DFLARE_CACHE", str(tmp_path / "cache"))
    draft = tmp_path / "draft"
    assert main(["init-draft", "--target", str(smollm2_dir), "--out", str(draft), "--layers", "1",
                 "--block-size", "3"]) == 0
    out = tmp_path / "costs.json"
    common = ["--target", str(smollm2_dir), "--draft", str(draft)]
    assert main(["calibrate", *common, "--batch-sizes", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "relative to a plain one-token step" in text and str(out) in text
    assert CostModel.load(out).lengths == (1, 2, 3)
    assert main(["generate", *common, "--prompt", "Hi", "--max-new-tokens", "4",
                 "--cost-model", str(out)]) == 0
    assert "verified n=" in capsys.readouterr().out
