"""The decoding engine is lossless: greedy output is the target's own greedy output, and
sampled output is exactly target-only sampling with the same seeded Gumbel noise, whose
token distribution is the target's (chi-square test).

All in float32 on the real SmolLM2-135M-Instruct target. Drafts are real DFlare / DFlash
models: randomly initialised (losslessness must not depend on draft quality) and one with
hand-set weights that drafts a fixed token, so that long accepted runs are exercised too.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.verify import sample_rows

MAX_NEW = 24


@pytest.fixture(scope="module")
def target(smollm2_target):
    return smollm2_target


def _draft(model, fusion: str, layers: int, block_size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DraftConfig.for_target(
        model.config, num_draft_layers=layers, fusion=fusion, block_size=block_size
    )
    draft = DFlareDraftModel(cfg).float().eval()
    if draft.hidden_correction is not None:  # DFly starts with no correction: give it one
        # (strong enough to change most picks, so the correction chain is what is tested)
        with torch.no_grad():
            draft.hidden_correction.down_proj.weight.normal_(0.0, 1.0)
    return draft


def _repeat_draft(model, token_id: int, fusion: str = "layerwise") -> DFlareDraftModel:
    """A real draft whose layers add nothing to the residual stream, so every MASK position
    decodes to lm_head(norm(embed(mask))): with the mask token set to ``token_id`` it drafts
    that token again and again."""
    cfg = DraftConfig.for_target(
        model.config, num_draft_layers=1, fusion=fusion, mask_token_id=token_id
    )
    torch.manual_seed(0)
    draft = DFlareDraftModel(cfg).float().eval()
    with torch.no_grad():
        for layer in draft.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return draft


@pytest.fixture(scope="module")
def prompts(target):
    _, tok = target
    texts = load_prompts("mtbench", limit=10) + load_prompts("humaneval", limit=10)
    out = []
    for t in texts:
        msgs = [{"role": "user", "content": t}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out.append(list(ids)[-96:])  # bound the prefill cost; any real token prefix will do
    return out


@pytest.fixture(scope="module")
def greedy_reference(target, prompts):
    model, tok = target
    refs = []
    for ids in prompts:
        inp = torch.tensor([ids])
        gen = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
        refs.append(gen[0, len(ids) :].tolist())
    return refs


@pytest.mark.parametrize(
    "batch_size,block_size,fusion",
    [
        (1, 4, "layerwise"),
        (1, 16, "layerwise"),
        (4, 4, "shared"),
        (4, 16, "layerwise"),
        (1, 8, "dfly"),
        (8, 8, "dfly"),
    ],
)
def test_greedy_equals_target_generate(
    target, prompts, greedy_reference, batch_size, block_size, fusion
):
    model, tok = target
    decoder = SpeculativeDecoder(model, _draft(model, fusion, 2), block_size=block_size)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(tok.eos_token_id,))
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        results = decoder.generate(batch, params)
        for j, r in enumerate(results):
            assert r.tokens == greedy_reference[start + j], f"prompt {start + j}"
            assert sum(r.accept_lengths) + 1 == len(r.tokens)


# SmolLM2 continues this with " ha" for ~37 of the next 40 tokens, and " ha" is a token whose
# embedding decodes to itself, so the repeat draft below is right most of the time.
LAUGH = "ha" + " ha" * 7


def _laugh(tok) -> tuple[list[int], int]:
    return (
        tok.encode(LAUGH, add_special_tokens=False),
        tok.encode(" ha", add_special_tokens=False)[0],
    )


def test_greedy_with_long_accepted_runs(target, prompts, greedy_reference):
    """Drafts that are often right: accepted runs, bonus tokens and stop-inside-block paths."""
    model, tok = target
    rep, word_id = _laugh(tok)
    decoder = SpeculativeDecoder(model, _repeat_draft(model, word_id), block_size=8)
    batch = [rep, prompts[0], rep, prompts[1]]
    ref0 = model.generate(
        torch.tensor([rep]),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )[0, len(rep) :].tolist()
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eos_token_id,))
    results = decoder.generate(batch, params)
    assert results[0].tokens == ref0 and results[2].tokens == ref0
    assert results[1].tokens[:MAX_NEW] == greedy_reference[0]
    assert results[3].tokens[:MAX_NEW] == greedy_reference[1]
    assert results[0].num_accepted > 10, "the repeat draft should be accepted on this prompt"
    assert max(results[0].accept_lengths) > 2


def test_reduced_draft_vocab(target, prompts, greedy_reference):
    """A draft restricted to N token ids proposes target tokens through them (the head's row i
    is token ``ids[i]``): the same proposals as the full head while its token is among them,
    never that token once it is not; the output stays the target's either way."""
    model, tok = target
    rep, word_id = _laugh(tok)
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eos_token_id,))
    batch = [rep, prompts[0]]
    full = SpeculativeDecoder(model, _repeat_draft(model, word_id), block_size=8).generate(
        batch, params
    )
    others = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    others = others[others != word_id][:4095]
    with_word = torch.cat([others, torch.tensor([word_id])])
    for ids, same_proposals in [(with_word, True), (others, False)]:
        draft = _repeat_draft(model, word_id)
        draft.set_draft_vocab(ids)
        decoder = SpeculativeDecoder(model, draft, block_size=8)
        assert decoder.draft_head.shape[0] == ids.numel()
        results = decoder.generate(batch, params)
        assert [r.tokens for r in results] == [r.tokens for r in full]
        assert results[1].tokens[:MAX_NEW] == greedy_reference[0]
        if same_proposals:
            assert [r.accept_lengths for r in results] == [r.accept_lengths for r in full]
        else:  # the laugh prompt's run of accepted " ha" drafts is gone
            assert full[0].num_accepted > 10 and results[0].num_accepted < 5


def _target_only_sample(model, ids: list[int], n: int, params: SamplingParams) -> list[int]:
    """Autoregressive target sampling with the engine's seeded Gumbel noise, one token a pass."""
    cache, out_ids, cur = DynamicCache(), [], torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    one = lambda x, dt: torch.tensor([x], dtype=dt)  # noqa: E731
    for _ in range(n):
        logits = model(cur, position_ids=pos, past_key_values=cache, use_cache=True).logits
        tok = sample_rows(
            logits[:, -1].float(),
            pos[:, -1],
            one(params.temperature, torch.float32),
            one(params.top_k, torch.int64),
            one(params.top_p, torch.float32),
            one(params.seed, torch.int64),
        )
        out_ids.append(int(tok))
        if out_ids[-1] in params.stop_token_ids:
            break
        cur, pos = tok[None], pos[:, -1:] + 1
    return out_ids


@pytest.mark.parametrize(
    "temperature,top_k,top_p,fusion",
    [(0.7, 0, 1.0, "layerwise"), (1.0, 20, 0.9, "layerwise"), (1.0, 20, 0.9, "dfly")],
)
def test_sampling_equals_target_only_sampling(target, prompts, temperature, top_k, top_p, fusion):
    model, tok = target
    decoder = SpeculativeDecoder(model, _draft(model, fusion, 2), block_size=8)
    batch = prompts[:3]
    plist = [
        SamplingParams(
            MAX_NEW, temperature, top_k, top_p, seed=11 + i, stop_token_ids=(tok.eos_token_id,)
        )
        for i in range(len(batch))
    ]
    results = decoder.generate(batch, plist)
    for ids, p, r in zip(batch, plist, results):
        assert r.tokens == _target_only_sample(model, ids, MAX_NEW, p)


@pytest.mark.parametrize("fusion", ["layerwise", "dfly"])
def test_sampled_pair_distribution_is_the_targets(target, fusion):
    """Chi-square of the first two sampled tokens (the second comes from a verify step)
    against the exact target probabilities p(t1) p(t2 | t1); fixed seeds, alpha = 0.001.
    (DFly's correction head starts at zero, so its repeat draft repeats as well.)"""
    model, tok = target
    prompt, word_id = _laugh(tok)
    decoder = SpeculativeDecoder(model, _repeat_draft(model, word_id, fusion), block_size=4)
    params = [SamplingParams(2, temperature=1.5, top_k=3, seed=s) for s in range(600)]
    pairs = []
    for start in range(0, len(params), 300):
        chunk = params[start : start + 300]
        pairs += [tuple(r.tokens) for r in decoder.generate([prompt] * len(chunk), chunk)]

    def filtered_probs(ids):
        logits = model(torch.tensor([ids])).logits[0, -1].float() / 1.5
        keep = torch.topk(logits, 3).indices
        return keep.tolist(), torch.softmax(logits[keep], -1).tolist()

    expected = {}
    firsts, p1 = filtered_probs(prompt)
    for t1, q1 in zip(firsts, p1):
        seconds, p2 = filtered_probs(prompt + [t1])
        for t2, q2 in zip(seconds, p2):
            expected[(t1, t2)] = q1 * q2
    assert set(pairs) <= set(expected)
    keys = sorted(expected)
    observed = [pairs.count(k) for k in keys]
    total = sum(expected.values())  # 1 up to float rounding, which chisquare rejects
    stat = chisquare(observed, [expected[k] / total * len(pairs) for k in keys])
    assert stat.pvalue > 1e-3, (observed, stat)
    # The repeat draft proposes " ha": some second tokens must have come from acceptance.
    assert any(t2 == word_id for _, t2 in pairs)


def test_stats_and_streaming(target, prompts):
    model, _ = target
    decoder = SpeculativeDecoder(model, _draft(model, "layerwise", 1), block_size=4)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    results = decoder.generate(
        prompts[:2],
        [SamplingParams(5), SamplingParams(9)],
        on_commit=lambda i, new: streamed[i].extend(new),
    )
    assert [len(r.tokens) for r in results] == [5, 9]
    assert all(r.finish_reason == "length" for r in results)
    for i, r in enumerate(results):
        assert streamed[i] == r.tokens
        assert r.num_drafted == 3 * len(r.accept_lengths)
        assert r.tau >= 1.0 and r.wall_time_s > 0


def test_errors(target, prompts):
    model, _ = target
    decoder = SpeculativeDecoder(model, _draft(model, "layerwise", 1), block_size=4)
    with pytest.raises(ValueError, match="positions"):
        decoder.generate([prompts[0]], SamplingParams(max_new_tokens=10**6))
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate([[]], SamplingParams(4))
    with pytest.raises(ValueError, match=">= 1"):
        SpeculativeDecoder(model, _draft(model, "layerwise", 1), block_size=0)


def test_default_verify_length_is_adaptive_up_to_the_drafts_block(target):
    """Unless told otherwise, the engine chooses each step's verify length (up to the draft's
    block, :mod:`dflare_sgl.verify_length`); ``block_size`` fixes it."""
    model, _ = target
    adaptive = SpeculativeDecoder(model, _draft(model, "layerwise", 1))
    assert adaptive.adaptive and adaptive.block_size == 16
    fixed = SpeculativeDecoder(model, _draft(model, "layerwise", 1), block_size=5)
    assert not fixed.adaptive and fixed.block_size == 5
