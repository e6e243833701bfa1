"""DFLARE inside a real SGLang 0.5.23 Engine on CPU (no mock of SGLang).

Engines, each started once for the module: SmolLM2-135M-Instruct without speculation (the
reference); with DFLARE and a random-weight DFlare draft, verifying a fixed block
(``--speculative-num-draft-tokens``) or choosing the verify length each step (the default);
and with DFLARE and a test-only worker that drafts known-correct continuations (long
acceptance). All run
in float32, so greedy equality is exact: no bf16 logit ties to break differently between
the verify GEMM (M = B rows per request) and the decode GEMM (M = 1). Every engine has the
radix cache on and chunked prefill at 32 tokens, and runs SGLang's strict idle memory
check (a leaked KV or request slot raises in the scheduler and fails the run).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from sglang_support import engine_kwargs, run_engine

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig, capture_target_hidden

MAX_NEW = 24
SHARED = (
    "You are a helpful assistant. Answer the question briefly and precisely, using simple "
    "words that a child could understand, in one or two sentences. Question: "
)
PROMPTS = [  # ragged; the SHARED ones exceed one 32-token prefill chunk
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time",
    SHARED + "What is the sun?",
    SHARED + "Why is the sky blue?",
    "Translate to French: I like apples.",
    "The quick brown fox",
    SHARED + "How do birds fly?",
]
# Sent after PROMPTS finished: their SHARED prefix is then in the radix cache.
CACHED_PROMPTS = [SHARED + "What is rain?", SHARED + "Why do cats purr?"]
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
# Sampling check: the token after "Once upon a time" + "," (p = 0.93) comes from DFLARE's
# verify step (the first one is sampled by SGLang's own prefill sampler); the oracle drafts
# the greedy continuation there, so both accepted and rejected drafts occur.
SAMPLE_PROMPT = "Once upon a time"
SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "max_new_tokens": 2}
NUM_SAMPLES = 300


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _write_draft(
    target_dir,
    out_dir,
    block_size: int,
    fusion: str = "layerwise",
    embedding=None,
    seed=0,
    draft_vocab: int | None = None,
):
    from transformers import AutoConfig

    config = DraftConfig.for_target(
        AutoConfig.from_pretrained(target_dir),
        num_draft_layers=2,
        block_size=block_size,
        fusion=fusion,
    )
    draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(seed))
    if draft.hidden_correction is not None:  # DFly starts with no correction: give it one
        # (strong enough to change most picks, so the correction chain is what is tested)
        with torch.no_grad():
            draft.hidden_correction.down_proj.weight.normal_(
                0.0, 1.0, generator=torch.Generator().manual_seed(1)
            )
    if draft_vocab is not None:  # random target ids: a full-vocabulary head picks others
        vocab = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(2))
        draft.set_draft_vocab(vocab[:draft_vocab])
    draft.save_pretrained(out_dir, embedding=embedding)
    return out_dir


def _greedy_jobs(tokenizer):
    return [
        {"kind": "generate", "input_ids": _ids(tokenizer, PROMPTS), "sampling_params": GREEDY},
        {
            "kind": "generate",
            "input_ids": _ids(tokenizer, CACHED_PROMPTS),
            "sampling_params": GREEDY,
        },
    ]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sglang_engine")


@pytest.fixture(scope="module")
def reference(smollm2_dir, tokenizer, workdir):
    """Greedy outputs of the target alone in the same engine configuration."""
    return run_engine(workdir, "reference", engine_kwargs(smollm2_dir), _greedy_jobs(tokenizer))


@pytest.fixture(scope="module")
def dflare_random(smollm2_dir, tokenizer, workdir):
    """DFLARE with a random-weight draft (block 4, proposing 2048 of the target's tokens):
    greedy runs, then churn with aborts; the draft's proposals are recorded (drafts.jsonl)
    for the parity test."""
    draft = _write_draft(smollm2_dir, workdir / "draft_b4", block_size=4, draft_vocab=2048)
    churn_ids = _ids(tokenizer, [f"Count from {i} to {i + 20}:" for i in range(200)])
    churn_params = [
        {"temperature": 0.7 if i % 2 else 0, "max_new_tokens": 6 + i % 11} for i in range(200)
    ]
    jobs = _greedy_jobs(tokenizer) + [
        {"kind": "server_info"},
        {
            "kind": "churn",
            "input_ids": churn_ids,
            "sampling_params": churn_params,
            "abort_every": 4,
        },
        {"kind": "flush_cache"},
        _greedy_jobs(tokenizer)[0],
    ]
    return run_engine(
        workdir,
        "dflare_random",
        engine_kwargs(smollm2_dir, draft, speculative_num_draft_tokens=4),
        jobs,
        DFLARE_SGLANG_WORKER="sglang_test_workers:DraftRecordingWorker",
        DFLARE_TEST_RECORD=str(workdir / "drafts.jsonl"),
        DFLARE_TEST_SYNC_RECORD=str(workdir / "tp_sync.jsonl"),
    )


@pytest.fixture(scope="module")
def dfly_random(smollm2_target, smollm2_dir, tokenizer, workdir):
    """DFLARE serving a random-weight DFly draft (block 4, its correction head on, the
    target embedding exported as DFly checkpoints carry it); proposals recorded."""
    embedding = smollm2_target[0].get_input_embeddings().weight
    draft = _write_draft(smollm2_dir, workdir / "dfly_b4", 4, "dfly", embedding)
    return run_engine(
        workdir,
        "dfly_random",
        # info: the start-up rehearsal
        engine_kwargs(smollm2_dir, draft, log_level="info", speculative_num_draft_tokens=4),
        _greedy_jobs(tokenizer) + [{"kind": "server_info"}],
        DFLARE_SGLANG_WORKER="sglang_test_workers:DraftRecordingWorker",
        DFLARE_TEST_RECORD=str(workdir / "dfly_drafts.jsonl"),
    )


def _served_after_update(smollm2_target, smollm2_dir, tokenizer, workdir, fusion: str) -> None:
    """DFLARE started with one random draft whose weights are then replaced live by another
    checkpoint's ({fusion}_served; SGLang's update_weights_from_tensor on the draft runner);
    proposals recorded after the update in {fusion}_updated_drafts.jsonl."""
    embedding = smollm2_target[0].get_input_embeddings().weight if fusion == "dfly" else None
    start = _write_draft(smollm2_dir, workdir / f"{fusion}_start", 4, fusion, embedding, seed=5)
    served = _write_draft(smollm2_dir, workdir / f"{fusion}_served", 4, fusion, embedding, seed=6)
    jobs = [
        {"kind": "update_draft_weights", "path": str(served / "model.safetensors")},
        _greedy_jobs(tokenizer)[0],
    ]
    update, _ = run_engine(
        workdir,
        f"{fusion}_updated",
        engine_kwargs(smollm2_dir, start, speculative_num_draft_tokens=4),
        jobs,
        DFLARE_SGLANG_WORKER="sglang_test_workers:DraftRecordingWorker",
        DFLARE_TEST_RECORD=str(workdir / f"{fusion}_updated_drafts.jsonl"),
    )
    assert update["success"], update


@pytest.fixture(scope="module")
def dflare_updated(smollm2_target, smollm2_dir, tokenizer, workdir):
    _served_after_update(smollm2_target, smollm2_dir, tokenizer, workdir, "layerwise")


@pytest.fixture(scope="module")
def dfly_updated(smollm2_target, smollm2_dir, tokenizer, workdir):
    _served_after_update(smollm2_target, smollm2_dir, tokenizer, workdir, "dfly")


@pytest.fixture(scope="module")
def dflare_oracle(smollm2_dir, tokenizer, workdir, reference):
    """DFLARE (block 8) drafting the reference's own greedy continuations, one draft token
    corrupted in every third block; plus the sampling job."""
    draft = _write_draft(smollm2_dir, workdir / "draft_b8", block_size=8)
    prompts = _ids(tokenizer, PROMPTS)
    entries = [
        {"prompt": p, "continuation": out["output_ids"]}
        for p, out in zip(prompts, reference[0], strict=True)
    ]
    oracle = workdir / "oracle.json"
    oracle.write_text(json.dumps({"entries": entries, "corrupt_every": 3}))
    sample_ids = _ids(tokenizer, [SAMPLE_PROMPT])[0]
    jobs = [
        {"kind": "generate", "input_ids": prompts, "sampling_params": GREEDY},
        {
            "kind": "generate",
            "input_ids": [sample_ids] * NUM_SAMPLES,
            "sampling_params": SAMPLING,
        },
    ]
    return run_engine(
        workdir,
        "dflare_oracle",
        engine_kwargs(smollm2_dir, draft, speculative_num_draft_tokens=8),
        jobs,
        DFLARE_SGLANG_WORKER="sglang_test_workers:OracleDraftWorker",
        DFLARE_TEST_ORACLE=str(oracle),
    )


@pytest.fixture(scope="module")
def dflare_adaptive(smollm2_dir, tokenizer, workdir):
    """DFLARE choosing each decode step's verify length (no --speculative-num-draft-tokens)
    with a random-weight block-8 draft: nothing is accepted, every request takes MAX_NEW - 1
    decode steps; the server's first steps measure 1, 8 and 2, then it decodes plainly with
    a probe (n=2) now and then."""
    draft = _write_draft(smollm2_dir, workdir / "draft_b8_adaptive", block_size=8, seed=3)
    return run_engine(
        workdir,
        "dflare_adaptive",
        engine_kwargs(smollm2_dir, draft),
        _greedy_jobs(tokenizer) + [{"kind": "server_info"}],
    )


def _tokens(outputs):
    return [o["output_ids"] for o in outputs]


def test_random_draft_greedy_matches_target(reference, dflare_random):
    assert _tokens(dflare_random[0]) == _tokens(reference[0])
    assert _tokens(dflare_random[1]) == _tokens(reference[1])
    # The shared prefix came from the radix cache (target and draft KV at the same slots).
    assert all(o["meta"]["cached_tokens"] >= 24 for o in dflare_random[1])
    # Every request decoded through DFLARE verify steps (one per committed block).
    assert all(o["meta"]["spec_verify_ct"] >= 1 for o in dflare_random[0])


def test_dfly_draft_greedy_matches_target(reference, dfly_random):
    assert _tokens(dfly_random[0]) == _tokens(reference[0])
    assert _tokens(dfly_random[1]) == _tokens(reference[1])
    assert dfly_random[2]["speculative_algorithm"] == "DFLARE"


@pytest.mark.parametrize("served,folder,record", [
    ("dflare_random", "draft_b4", "drafts.jsonl"),
    ("dfly_random", "dfly_b4", "dfly_drafts.jsonl"),
    ("dflare_updated", "layerwise_served", "layerwise_updated_drafts.jsonl"),
    ("dfly_updated", "dfly_served", "dfly_updated_drafts.jsonl"),
])
def test_draft_proposals_match_reference_model(
    request, smollm2_target, tokenizer, workdir, reference, served, folder, record
):
    """SGLang's draft classes (QwenDFlareDraftModel; Qwen3DFlyModel with its correction
    chain) with layer_mix_kv context propose the tokens that the package's reference
    DFlareDraftModel proposes from the same checkpoint and context (over its reduced
    vocabulary where it has one); after a live weight update, from the new checkpoint."""
    request.getfixturevalue(served)
    model, _ = smollm2_target
    draft = DFlareDraftModel.from_pretrained(workdir / folder)
    block = draft.block_size
    sequences = {
        tuple(p): p + out["output_ids"]
        for p, out in zip(_ids(tokenizer, PROMPTS), reference[0], strict=True)
    }
    records = [json.loads(line) for line in (workdir / record).open()]
    records = [r for r in records if tuple(r["prompt"]) in sequences][:16]
    assert len(records) == 16
    matches = 0
    for r in records:
        seq, prefix = sequences[tuple(r["prompt"])], r["prefix"]
        assert r["block"][0] == seq[prefix]  # x_last: the greedy output is the reference's
        block_ids = torch.tensor([[seq[prefix]] + [draft.mask_token_id] * (block - 1)])
        with torch.no_grad():
            hidden = model(torch.tensor([seq[:prefix]]), output_hidden_states=True).hidden_states
            # SGLang's ModelRunner hands the draft its input embeddings as bfloat16.
            noise = model.get_input_embeddings()(block_ids).bfloat16().float()
            out = draft(
                position_ids=torch.arange(prefix + block)[None],
                noise_embedding=noise,
                target_hidden=capture_target_hidden(hidden, draft.target_layer_ids),
            )
            proposed = draft.draft_tokens(
                out,
                block_ids[:, 0],
                model.get_input_embeddings(),
                _greedy_head(model.lm_head.weight, draft.draft_vocab_ids),
            )[0].tolist()
        matches += sum(a == b for a, b in zip(proposed, r["block"][1:], strict=True))
    # fp32 on both sides; only summation order differs between the two implementations.
    assert matches / (len(records) * (block - 1)) >= 0.95, matches


def _greedy_head(weight, vocab_ids):
    """The draft's greedy pick over the target's head, restricted to ``vocab_ids`` if set."""
    if vocab_ids is None:
        return lambda h: (h @ weight.T).argmax(-1)
    return lambda h: vocab_ids[(h @ weight[vocab_ids].T).argmax(-1)]


def test_verify_decision_goes_through_tensor_parallel_sync(dflare_random, workdir):
    """Each verify step hands rank 0's decision (accept lengths, committed counts, committed
    tokens) to SGLang's SpecTpSync, at DFlash's greedy or sampled accept site: broadcast to
    the TP group when SGLANG_SPEC_TP_SYNC selects that site."""
    calls = [json.loads(line) for line in (workdir / "tp_sync.jsonl").open()]
    ours = [c for c in calls if c["site"] in ("DFLASH_ACCEPT_GREEDY", "DFLASH_ACCEPT_SAMPLE")]
    assert ours and len(ours) % 3 == 0
    sites = set()
    for accept, committed_count, committed in zip(ours[::3], ours[1::3], ours[2::3], strict=True):
        assert accept["site"] == committed_count["site"] == committed["site"]
        sites.add(accept["site"])
        assert accept["dtype"] == committed_count["dtype"] == committed["dtype"] == "torch.int64"
        for a, n, row in zip(accept["values"], committed_count["values"], committed["values"],
                             strict=True):  # fmt: skip
            assert n == a + 1 and len(row) == 4  # block 4; no budget cut in the worker
            assert all(t >= 0 for t in row[:n]) and all(t == -1 for t in row[n:])
    # The churn job mixes greedy and sampled requests.
    assert sites == {"DFLASH_ACCEPT_GREEDY", "DFLASH_ACCEPT_SAMPLE"}


def test_startup_rehearses_the_dflare_ops(dfly_random, workdir):
    """Before the KV pool is sized, the worker runs verify_block at the largest verify batch
    and layer_mix_kv over a prefill tile (on a GPU their peak memory becomes headroom)."""
    log = (workdir / "dfly_random.log").read_text()
    pattern = r"DFLARE pre-warm: verify_block (\d+)x4x\d+ .*layer_mix_kv (\d+) tokens"
    rehearsal = re.search(pattern, log)
    assert rehearsal, log[-2000:]
    assert int(rehearsal[1]) >= 1 and int(rehearsal[2]) == 32  # block 4; chunked prefill 32


def test_accept_length_in_server_info(dflare_random):
    info = dflare_random[2]
    assert info["speculative_algorithm"] == "DFLARE"
    assert info["avg_spec_accept_length"] >= 1.0
    lengths = info["dflare_verify_lengths"]  # fixed by the flag: every step verifies 4
    assert not lengths["adaptive"] and lengths["lengths"] == [4]
    assert lengths["steps_by_length"] == {"4": lengths["decode_steps"]}
    assert lengths["decode_steps"] > 0


def test_adaptive_verify_length_is_lossless(reference, dflare_adaptive):
    """Ragged prompts in one batch while the verify length changes step to step, down to
    plain one-token steps (no draft pass): the target's greedy output, token for token."""
    assert _tokens(dflare_adaptive[0]) == _tokens(reference[0])
    assert _tokens(dflare_adaptive[1]) == _tokens(reference[1])
    lengths = dflare_adaptive[2]["dflare_verify_lengths"]
    assert lengths["adaptive"] and lengths["lengths"] == list(range(1, 9))
    chosen = {int(n): count for n, count in lengths["steps_by_length"].items()}
    assert sum(chosen.values()) == lengths["decode_steps"] >= MAX_NEW - 1
    # Plain steps, the whole block and a one-draft step (each its own code path).
    assert {1, 2, 8} <= set(chosen) and chosen[1] > chosen[8], chosen
    # Measured step costs (a plain forward and the rest of a step per batch size, forward
    # ratios per bucket: the CPU worker times its forward); nothing accepted.
    costs = lengths["step_costs"]
    assert costs["plain_forward_ms"] and any(k.startswith("forward_vs_plain_") for k in costs)
    assert costs["rest_ms"] and all(ms > 0.0 for ms in costs["rest_ms"].values())
    assert max(lengths["acceptance_by_position"]) < 0.5


def test_churn_with_aborts_leaks_nothing(reference, dflare_random):
    churn = dflare_random[3]
    assert churn == {"finished": 150, "aborted": 50}
    # flush_cache succeeds only when no request holds KV; SGLang's strict idle check
    # (available + evictable == total for the KV allocator the target and draft pools
    # share, and for the request pool) ran after every step and did not raise.
    assert dflare_random[4] is True
    assert _tokens(dflare_random[5]) == _tokens(reference[0])


def test_known_drafts_long_acceptance(reference, dflare_oracle):
    greedy = dflare_oracle[0]
    assert _tokens(greedy) == _tokens(reference[0])
    accept = [o["meta"]["spec_accept_length"] for o in greedy]
    # Block 8 with a wrong token in every third block: ~4-6 tokens per verify step.
    assert np.mean(accept) > 3.0, accept


def test_sampling_matches_target_distribution(smollm2_target, tokenizer, dflare_oracle):
    """Chi-square of the verify-sampled token against the target's filtered distribution."""
    model, _ = smollm2_target
    samples = [o["output_ids"] for o in dflare_oracle[1]]
    first = max({s[0] for s in samples}, key=[s[0] for s in samples].count)
    seconds = [s[1] for s in samples if s[0] == first]
    assert len(seconds) >= NUM_SAMPLES // 2
    ids = torch.tensor([_ids(tokenizer, [SAMPLE_PROMPT])[0] + [first]])
    with torch.no_grad():
        z = model(ids).logits[0, -1].float() / SAMPLING["temperature"]
    z[z < z.topk(SAMPLING["top_k"]).values[-1]] = -float("inf")
    probs = z.softmax(-1)
    order = probs.argsort(descending=True)
    above = probs[order].cumsum(0) - probs[order]
    probs[order[above >= SAMPLING["top_p"]]] = 0
    probs /= probs.sum()
    assert all(probs[t] > 0 for t in seconds), "sampled a token the filters exclude"
    n = len(seconds)
    probs = probs.double()
    bins = [t for t in probs.nonzero().flatten().tolist() if probs[t] * n >= 5]
    observed = np.array([seconds.count(t) for t in bins] + [0.0])
    observed[-1] = n - observed.sum()
    expected = np.array([float(probs[t]) * n for t in bins] + [0.0])
    expected[-1] = n - expected.sum()
    if expected[-1] < 1e-6:  # the binned tokens hold all the mass
        observed, expected = observed[:-1], expected[:-1]
    result = chisquare(observed, expected * observed.sum() / expected.sum())
    assert len(bins) >= 4 and result.pvalue > 1e-3, (bins, observed, expected)
