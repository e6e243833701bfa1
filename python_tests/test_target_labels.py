"""Target-labelled text (``gen-data --responses labelled``) and the soft-target KL in training:
the conversation's loss mask, the prefill's labels against the target's own logits, the files,
resume, and a training run that reads them (tiny random Llama target, real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_training_run import _gen_config, _tiny_target, _train_config
from transformers import AutoTokenizer

from dflare_sgl.target import load_target
from dflare_sgl.training.data import load_sequences, soft_targets_path, training_prompts
from dflare_sgl.training.draft_vocab import response_token_counts
from dflare_sgl.training.generate import generate_data
from dflare_sgl.training.loader import collate
from dflare_sgl.training.target_labels import conversation_tokens
from dflare_sgl.training.trainer import train

TOP_K = 4
MAX_LEN = 512
# 6 ShareGPT conversations (cut at MAX_LEN tokens) in 2 shards.
LABELLED = {
    "responses": "labelled",
    "limit": 6,
    "max_len": MAX_LEN,
    "top_k": TOP_K,
    "batch_size": 2,
    "shard_size": 3,
}


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, smollm2_dir) -> str:
    return str(_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_target) -> Path:
    """LABELLED, labelled by the tiny target."""
    return generate_data(_gen_config(tiny_target, tmp_path_factory.mktemp("labelled"), **LABELLED))


def test_conversation_loss_mask(smollm2_dir):
    """Every assistant turn's text and the <|im_end|> after it are in the loss mask, nothing
    else (system prompt, user turns, role headers, newlines); a cut keeps the first tokens."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = (
        ("user", "Name a river. "),
        ("assistant", " The Nile.\n"),
        ("user", "And another?"),
        ("assistant", "The Danube, which flows through Vienna."),
    )
    ids, mask = conversation_tokens(tokenizer, turns, {im_end}, max_len=1000)
    messages = [{"role": r, "content": t.strip()} for r, t in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    masked = [t for t, m in zip(ids, mask, strict=True) if m]
    expected = "The Nile.<|im_end|>The Danube, which flows through Vienna.<|im_end|>"
    assert tokenizer.decode(masked) == expected
    cut = conversation_tokens(tokenizer, turns, {im_end}, max_len=len(ids) - 5)
    assert cut == (ids[: len(ids) - 5], mask[: len(ids) - 5])
    assert conversation_tokens(tokenizer, turns, {im_end}, max_len=10) is None  # no reply fits


def test_labels_are_the_targets_own(labelled, tiny_target):
    """Per loss-mask position p: target_ids is the argmax of the target's logits at p - 1 (one
    unbatched forward here, against the batched, right-padded prefill), the top-k file its
    K likeliest tokens and their log-probabilities; multi-turn conversations are whole."""
    target, tokenizer = load_target(tiny_target, dtype=torch.float32)
    sequences = load_sequences(labelled)
    assert len(sequences) == 6 and len(list(labelled.glob("shard-*.jsonl"))) == 2
    assert all(soft_targets_path(s).is_file() for s in labelled.glob("shard-*.jsonl"))
    turns = {p.id: p.conversation for p in training_prompts(limit=40, whole_conversations=True)}
    multi_turn = 0
    for s in sequences:
        with torch.no_grad():
            logprobs = target(s.input_ids[None]).logits[0].log_softmax(-1)
        positions = s.loss_mask.nonzero().flatten()
        assert positions.min() >= 1 and (s.target_ids[~s.loss_mask] == -1).all()
        values, ids = logprobs[positions - 1].topk(TOP_K, dim=-1)
        assert torch.equal(s.target_ids[positions], ids[:, 0])
        assert torch.equal(s.topk_ids, ids)
        torch.testing.assert_close(s.topk_logprobs, values, rtol=1e-5, atol=1e-5)
        spans = (s.loss_mask[1:] & ~s.loss_mask[:-1]).sum() + s.loss_mask[0]
        multi_turn += int(spans) > 1
    assert multi_turn > 0
    rows = [json.loads(line) for line in (labelled / "shard-00000.jsonl").open()]
    assert {"target_ids", "loss_mask", "input_ids"} <= set(rows[0])
    first = rows[0]
    reply = next(t for r, t in turns[first["id"]] if r == "assistant").strip()
    masked = [t for t, m in zip(first["input_ids"], first["loss_mask"], strict=True) if m]
    assert tokenizer.decode(masked).startswith(reply[:40])
    # The draft vocabulary of labelled data counts the target's tokens, not the text's.
    counts = response_token_counts(labelled, target.config.vocab_size)
    assert counts.sum() == sum(int(s.loss_mask.sum()) for s in sequences)
    assert set(counts.nonzero().flatten().tolist()) == {
        t for s in sequences for t in s.target_ids[s.loss_mask].tolist()
    }


def test_labelled_resume_and_settings(tmp_path, tiny_target, labelled):
    """A deleted shard (and its top-k file) comes back byte for byte; other settings refused."""
    cfg = _gen_config(tiny_target, tmp_path, **LABELLED)
    generate_data(cfg)
    shard = tmp_path / "shard-00001.jsonl"
    before = shard.read_bytes(), soft_targets_path(shard).read_bytes()
    shard.unlink()
    generate_data(cfg)
    assert (shard.read_bytes(), soft_targets_path(shard).read_bytes()) == before
    assert shard.read_bytes() == (labelled / "shard-00001.jsonl").read_bytes()
    with pytest.raises(ValueError, match="another target or settings"):
        generate_data(replace(cfg, top_k=2))


def test_batches_carry_labels_and_soft_targets(labelled):
    """collate: target ids and top-k scattered to their positions, -1 / 0 elsewhere."""
    sequences = load_sequences(labelled)[:3]
    batch = collate(sequences, max_len=100)
    for i, s in enumerate(sequences):
        s = s.cut(100)
        n = len(s.input_ids)
        assert torch.equal(batch.target_ids[i, :n], s.target_ids)
        assert torch.equal(batch.topk_ids[i][batch.loss_mask[i]], s.topk_ids)
        assert torch.equal(batch.topk_logprobs[i][batch.loss_mask[i]], s.topk_logprobs)
        assert (batch.topk_ids[i][~batch.loss_mask[i]] == -1).all()
        assert (batch.target_ids[i, n:] == -1).all()


@pytest.mark.parametrize("vocab", [None, 64], ids=["full_head", "draft_vocab"])
def test_training_with_the_soft_target_kl(tmp_path, tiny_target, labelled, vocab):
    """train --kl-weight on labelled data: the KL is logged, finite, and falls; over a draft
    vocabulary too. On data without soft targets, one clear error naming the fix."""
    cfg = _train_config(
        tiny_target,
        str(labelled),
        tmp_path / "draft",
        steps=12,
        kl_weight=1.0,
        draft_vocab_size=vocab,
    )
    out = train(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    kl = [m["soft_target_kl"] for m in metrics]
    assert len(kl) == 12 and all(map(math.isfinite, kl)) and min(kl) > -1e-6
    assert sum(kl[-3:]) < sum(kl[:3])
    greedy_only = generate_data(
        _gen_config(tiny_target, tmp_path / "greedy", responses="labelled", limit=2, top_k=0)
    )
    assert not list(greedy_only.glob("*.safetensors"))
    with pytest.raises(ValueError, match="--responses labelled --top-k K"):
        train(replace(cfg, data=str(greedy_only), out=str(tmp_path / "x")))
