"""gen-data and train end to end on a tiny random Llama target (the real SmolLM2 tokenizer):
shards and resume, exact training resume, a 2-process FSDP2 run, learning, and CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dflare_sgl.cli import main
from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.target import load_target
from dflare_sgl.training.context_cache import TargetContextCache
from dflare_sgl.training.data import load_sequences, training_prompts
from dflare_sgl.training.data import read_metadata as data_metadata
from dflare_sgl.training.draft_vocab import most_frequent_tokens, response_token_counts
from dflare_sgl.training.generate import GenDataConfig, generate_data
from dflare_sgl.training.initialize import init_from_draft, init_from_target
from dflare_sgl.training.loader import collate
from dflare_sgl.training.objective import draft_block_stats, target_context
from dflare_sgl.training.trainer import TrainConfig, held_out_tau, train


def _tiny_target(folder: Path, tokenizer_dir: Path, hidden: int = 64) -> Path:
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Embeddings 10x the layers' scale: the residual stream carries the last token, so the
    # greedy continuation is a confident, learnable pattern (it repeats the prompt's last
    # token) instead of near-uniform noise that no draft can learn in a few dozen steps.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, smollm2_dir) -> str:
    return str(_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir))


def _gen_config(target: str, out: Path, **kw) -> GenDataConfig:
    base = GenDataConfig(
        target=target,
        out=str(out),
        limit=12,
        max_new_tokens=24,
        max_prompt_tokens=64,
        batch_size=6,
        shard_size=6,
        temperature=0.0,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_target) -> str:
    """12 greedy responses of the tiny target in 2 shards."""
    out = tmp_path_factory.mktemp("data")
    cfg = _gen_config(tiny_target, out)
    return str(generate_data(cfg))


def _train_config(target: str, data: str, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(
        target=target,
        data=data,
        out=str(out),
        layers=1,
        block_size=4,
        anchors=8,
        batch_size=2,
        precision="fp32",
        save_every=100,
        lr=3e-3,
    )
    return replace(base, **kw)


def test_gen_data_shards_and_resume(tmp_path, tiny_target, tiny_data):
    rows = [
        json.loads(line)
        for shard in sorted(Path(tiny_data).glob("shard-*.jsonl"))
        for line in shard.open()
    ]
    assert len(rows) == 12 and len(list(Path(tiny_data).glob("shard-*.jsonl"))) == 2
    for row in rows:
        mask = row["loss_mask"]
        assert len(mask) == len(row["input_ids"]) and 1 <= sum(mask) <= 24
        assert mask == sorted(mask)  # prompt (0) then response (1)
    # Sampled data: delete a shard, re-run, get the same bytes back (seed per shard).
    cfg = _gen_config(
        tiny_target,
        tmp_path,
        limit=4,
        max_new_tokens=8,
        batch_size=2,
        shard_size=2,
        temperature=1.0,
    )
    generate_data(cfg)
    second = tmp_path / "shard-00001.jsonl"
    before = second.read_bytes()
    second.unlink()
    generate_data(cfg)
    assert second.read_bytes() == before
    with pytest.raises(ValueError, match="another target or settings"):
        generate_data(replace(cfg, max_new_tokens=9))


def test_training_prompts_are_deduplicated():
    texts = [" ".join(p.text.split()).lower() for p in training_prompts(limit=2000)]
    assert len(texts) == len(set(texts)) == 2000


def test_gen_data_keeps_sharegpt_replies(tmp_path, tiny_target):
    """--responses sharegpt: each response is ShareGPT's own reply, tokenised, cut at
    max_new_tokens or ended by the stop token; no generation."""
    out = generate_data(_gen_config(tiny_target, tmp_path, responses="sharegpt", limit=8))
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    replies = {p.id: p.reply for p in training_prompts(limit=40)}
    rows = [
        json.loads(line) for shard in sorted(out.glob("shard-*.jsonl")) for line in shard.open()
    ]
    assert len(rows) == 8
    cut = 0
    for row in rows:
        response = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        expected = tokenizer.encode(replies[row["id"]].strip(), add_special_tokens=False)
        if len(expected) >= 24:
            assert response == expected[:24]
            cut += 1
        else:
            assert response == expected + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert 0 < cut < 8  # both cases were exercised
    assert data_metadata(out)["settings"]["responses"] == "sharegpt"


def test_gen_data_from_a_prompts_file(tmp_path, tiny_target):
    """--prompts FILE: a JSONL file's prompts, deduplicated and without evaluation prompts,
    like ShareGPT's; a malformed line is refused with its line number."""
    mtbench = load_prompts("mtbench", limit=1)[0]
    rows = [
        {"id": "a", "text": "Name three rivers.", "reply": "Nile, Amazon, Danube."},
        {"text": "name  three RIVERS.", "reply": "A duplicate."},
        {"id": "c", "text": mtbench, "reply": "An evaluation prompt."},
        {"id": "d", "text": "Count to three.", "reply": "1, 2, 3."},
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.id for p in training_prompts(source=str(file))] == ["a", "d"]
    out = generate_data(
        _gen_config(tiny_target, tmp_path / "data", prompts=str(file), responses="sharegpt")
    )
    assert [json.loads(line)["id"] for line in (out / "shard-00000.jsonl").open()] == ["a", "d"]
    file.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1 is not a JSON object with a \"text\""):
        training_prompts(source=str(file))
    with pytest.raises(ValueError, match="held out on purpose"):
        generate_data(_gen_config(tiny_target, tmp_path / "x", prompts="mtbench"))


@pytest.mark.parametrize("cache", [False, True], ids=["recompute", "cache_target_hidden"])
def test_resume_is_exact(tmp_path, tiny_target, tiny_data, cache):
    """6 steps straight == 3 steps, stop, --resume, 3 more steps (CPU fp32, bit for bit).
    Both evaluate real tau on 2 held-out sequences every 3 steps, which must not disturb it.
    With the target-hidden cache, steps 5-6 start a second epoch: the straight run reads them
    from its cache, the resumed one (empty cache) recomputes part of them."""
    evals = {
        "eval_every": 3,
        "eval_prompts": 2,
        "eval_max_new_tokens": 8,
        "cache_target_hidden": cache,
    }
    straight = train(_train_config(tiny_target, tiny_data, tmp_path / "a", steps=6, **evals))
    split = _train_config(tiny_target, tiny_data, tmp_path / "b", steps=6, **evals)
    train(replace(split, stop_after_steps=3))
    assert not (tmp_path / "b" / "model.safetensors").exists()  # not finished yet
    train(replace(split, resume=True))
    a, b = (
        load_file(straight / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logs = [
        [json.loads(x) for x in (d / "metrics.jsonl").open()]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert [r["step"] for r in logs[1] if "eval_tau" in r] == [3, 6]
    assert all(r["eval_tau"] >= 1.0 for r in logs[1] if "eval_tau" in r)


def test_scoring_over_a_draft_vocabulary(tiny_target, tiny_data):
    """A draft with a reduced vocabulary is scored over those rows of the head only: with every
    token, in another order, it scores exactly as with the full head; without the data's most
    frequent token, those labels are wrong with CE 0 (in_vocab False), and the others' CE only
    falls (a softmax over fewer tokens)."""
    target, _ = load_target(tiny_target, dtype=torch.float32)
    batch = collate(load_sequences(Path(tiny_data))[:4])
    config = DraftConfig.for_target(target.config, num_draft_layers=1, block_size=4)
    draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(0))

    def stats():
        anchors = torch.Generator().manual_seed(1)
        args = (8, 4, config.mask_token_id, config.target_layer_ids, anchors, None)
        return draft_block_stats(draft, target, batch, *args)

    full = stats()
    assert full.in_vocab is None
    vocab = config.vocab_size
    draft.draft_vocab_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(2))
    permuted = stats()
    torch.testing.assert_close(permuted.ce, full.ce, rtol=1e-6, atol=1e-6)
    assert torch.equal(permuted.correct, full.correct) and permuted.in_vocab.all()
    counts = response_token_counts(tiny_data, vocab)
    draft.draft_vocab_ids = (counts < counts.max()).nonzero().flatten()
    reduced = stats()
    lost = full.valid & ~reduced.in_vocab
    assert lost.any() and (reduced.in_vocab | lost).all()
    assert (reduced.ce[lost] == 0).all() and not reduced.correct[lost].any()
    kept = full.valid & reduced.in_vocab
    assert (reduced.ce[kept] <= full.ce[kept] + 1e-6).all()


def test_training_over_a_draft_vocabulary(tmp_path, tiny_target, tiny_data):
    """--draft-vocab-size: the run trains over the data's most frequent tokens (the tiny
    target's responses repeat one) and saves the draft with them."""
    out = train(_train_config(tiny_target, tiny_data, tmp_path, steps=3, draft_vocab_size=1))
    counts = response_token_counts(tiny_data, load_target(tiny_target)[0].config.vocab_size)
    saved = DFlareDraftModel.from_pretrained(out)
    assert torch.equal(saved.draft_vocab_ids, most_frequent_tokens(counts, 1))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").open()]
    assert len(losses) == 3 and all(map(math.isfinite, losses))


def test_cached_context_matches_batched(tiny_target, tiny_data):
    """A cached (per-sequence, unpadded) context equals the batched forward's on real tokens
    and is zero on padding."""
    target, _ = load_target(tiny_target, dtype=torch.float32)
    sequences = load_sequences(Path(tiny_data))
    batch = collate(sequences[:3])
    layers = [0, 1]
    cache = TargetContextCache(layers, None)
    cached = cache.context(target, batch, [0, 1, 2])
    batched = target_context(target, batch, layers, None)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(cached[real], batched[real], rtol=1e-5, atol=1e-5)
    assert not cached[~real].any()
    assert sorted(cache.store) == [0, 1, 2]
    assert torch.equal(cache.context(target, batch, [0, 1, 2]), cached)  # read back


def test_init_draft_starts_from_saved_weights(tmp_path, tiny_target, tiny_data):
    """--init-draft loads a saved draft of the same shape (at lr 0 training leaves it as it
    was) and refuses one of another shape, naming the flag."""
    target, _ = load_target(tiny_target, dtype=torch.float32)
    config = DraftConfig.for_target(target.config, num_draft_layers=1, block_size=4)
    saved = DFlareDraftModel(config, generator=torch.Generator().manual_seed(7))
    saved.set_draft_vocab(torch.arange(10, 20))  # an inference setting: not carried over
    saved.save_pretrained(tmp_path / "saved")
    saved.set_draft_vocab(None)
    out = train(
        _train_config(
            tiny_target,
            tiny_data,
            tmp_path / "run",
            init_draft=str(tmp_path / "saved"),
            steps=2,
            lr=0.0,
            weight_decay=0.0,
        )
    )
    trained = DFlareDraftModel.from_pretrained(out, dtype=torch.float32)
    assert trained.state_dict().keys() == saved.state_dict().keys()
    for name, p in saved.state_dict().items():
        assert torch.equal(trained.state_dict()[name], p), name
    with pytest.raises(ValueError, match="set --layers to match"):
        init_from_draft(DFlareDraftModel(replace(config, num_hidden_layers=2)), tmp_path / "saved")


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_init_from_target_copies_the_top_layers(tiny_target, fusion):
    target, _ = load_target(tiny_target, dtype=torch.float32)
    config = DraftConfig.for_target(target.config, num_draft_layers=2, fusion=fusion)
    draft = DFlareDraftModel(config)
    assert init_from_target(draft, target) == [4, 5]  # the tiny target has 6 layers
    for mine, theirs in zip(draft.layers, target.model.layers[4:], strict=True):
        for name, p in theirs.named_parameters():
            assert torch.equal(mine.get_parameter(name), p), name
        if fusion == "layerwise":
            assert torch.equal(mine.self_attn.k_proj_target.weight, theirs.self_attn.k_proj.weight)
            assert torch.equal(mine.self_attn.v_proj_target.weight, theirs.self_attn.v_proj.weight)
        assert torch.equal(mine.self_attn.q_norm.weight, torch.ones(config.head_dim))
    assert torch.equal(draft.norm.weight, target.model.norm.weight)
    narrow = DraftConfig.for_target(target.config, num_draft_layers=1, intermediate_size=32)
    with pytest.raises(ValueError, match="no same-shape counterpart"):
        init_from_target(DFlareDraftModel(narrow), target)


@pytest.mark.parametrize("fusion", ["layerwise", "dfly"])
def test_training_learns(tmp_path, tiny_target, tiny_data, fusion):
    """A few dozen steps on 12 sequences: the loss falls and real tau on the training prompts
    rises above the untrained draft's."""
    out = train(
        _train_config(tiny_target, tiny_data, tmp_path, steps=20, anchors=16, fusion=fusion)
    )
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").open()]
    print("losses", losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    target, _ = load_target(tiny_target)
    prompts = [s.prompt().tolist() for s in load_sequences(Path(tiny_data))]
    trained = DFlareDraftModel.from_pretrained(out)
    untrained = DFlareDraftModel(trained.config, generator=torch.Generator().manual_seed(0))
    taus = [
        held_out_tau(target, trained.config, d.state_dict(), prompts, 24)
        for d in (untrained, trained)
    ]
    print("taus", taus)
    assert taus[1] > taus[0] + 0.5, taus
    if fusion == "dfly":  # DFly's published layout, its correction head trained
        names = load_file(str(out / "model.safetensors")).keys()
        assert {"context_proj.weight", "final_norm.weight", "embed_tokens.weight"} <= names
        assert trained.hidden_correction.down_proj.weight.abs().max() > 0
        SpeculativeDecoder(target, trained, block_size=4)  # the exported embedding matches
        assert trained.exported_embedding is None


@pytest.mark.parametrize("fusion", ["layerwise", "dfly"])
def test_fsdp_two_processes(tmp_path, tiny_target, tiny_data, fusion):
    """torchrun, 2 CPU ranks, gloo: the checkpoint loads and decodes losslessly (DFly: its
    correction head runs inside the sharded forward; DFlare: trained over a draft vocabulary,
    a buffer beside the sharded parameters)."""
    out = tmp_path / "fsdp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",  # a free port of its own
        "-m",
        "dflare_sgl.cli",
        "train",
        "--target",
        tiny_target,
        "--data",
        tiny_data,
        "--out",
        str(out),
        "--steps",
        "3",
        "--layers",
        "2",
        "--block-size",
        "4",
        "--anchors",
        "4",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--fusion",
        fusion,
    ]
    vocab_size = 1 if fusion == "layerwise" else None
    if vocab_size:
        cmd += ["--draft-vocab-size", str(vocab_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun FSDP2 training timed out")
    assert proc.returncode == 0, log[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    for folder in (out, out / "checkpoints" / "step-000003"):
        draft = DFlareDraftModel.from_pretrained(folder)
        assert draft.config.num_hidden_layers == 2
        assert draft.config.draft_vocab_size == vocab_size
    target, _ = load_target(tiny_target)
    prompts = [s.prompt().tolist() for s in load_sequences(Path(tiny_data))[:3]]
    decoder = SpeculativeDecoder(target, draft, block_size=4)
    results = decoder.generate(prompts, SamplingParams(max_new_tokens=16))
    for prompt, res in zip(prompts, results, strict=True):
        ref = target.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )[0, len(prompt) :].tolist()
        assert res.tokens == ref


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dflare: error: "), err
    return err[0]


def test_cli_errors(tmp_path, tiny_target, tiny_data, smollm2_dir, capsys):
    base = [
        "train",
        "--target",
        tiny_target,
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
        "--layers",
        "1",
        "--block-size",
        "4",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]
    assert "does not exist" in _cli_error(base + ["--data", str(tmp_path / "none")], capsys)
    (tmp_path / "empty").mkdir()
    assert "gen-data" in _cli_error(base + ["--data", str(tmp_path / "empty")], capsys)
    other = str(_tiny_target(tmp_path / "other", smollm2_dir, hidden=32))
    other_args = ["--target", other] + base[3:] + ["--data", tiny_data]
    assert "another target" in _cli_error(["train"] + other_args, capsys)
    big = base + ["--data", tiny_data, "--block-size", "64"]
    assert "--block-size 64 is bigger" in _cli_error(big, capsys)
    assert main(base + ["--data", tiny_data]) == 0
    capsys.readouterr()
    resume = base + ["--data", tiny_data, "--layers", "2", "--resume", "--steps", "2"]
    assert "another shape" in _cli_error(resume, capsys)


def test_most_frequent_tokens_order_ties_and_unseen():
    counts = torch.tensor([0, 5, 2, 5, 0, 9, 1, 2])
    assert most_frequent_tokens(counts, 3).tolist() == [1, 3, 5]
    assert most_frequent_tokens(counts, 4).tolist() == [1, 2, 3, 5]  # tie 2 vs 7: lower id
    assert most_frequent_tokens(counts, 100).tolist() == [1, 2, 3, 5, 6, 7]  # seen ones only
    with pytest.raises(ValueError, match="at least one token"):
        most_frequent_tokens(counts, 0)
    with pytest.raises(ValueError, match="loss masks are empty"):
        most_frequent_tokens(torch.zeros(4, dtype=torch.int64), 2)


def test_draft_vocab_cli(tmp_path, tiny_target, tiny_data, capsys):
    config = DraftConfig.for_target(load_target(tiny_target)[0].config, num_draft_layers=1)
    DFlareDraftModel(config).save_pretrained(tmp_path / "draft")
    counts = torch.zeros(config.vocab_size, dtype=torch.int64)
    for s in load_sequences(Path(tiny_data)):
        counts += torch.bincount(s.input_ids[s.loss_mask], minlength=config.vocab_size)
    args = ["draft-vocab", "--data", tiny_data, "--draft", str(tmp_path / "draft"), "--size", "3"]
    assert main(args + ["--out", str(tmp_path / "reduced")]) == 0
    assert "covering 100.00% of the response tokens" in capsys.readouterr().out
    ids = DFlareDraftModel.from_pretrained(tmp_path / "reduced").draft_vocab_ids
    # The tiny target repeats one token, so its data has 1-3 distinct ones: all kept.
    assert ids.tolist() == counts.nonzero().flatten().tolist()
    assert torch.equal(response_token_counts(tiny_data, config.vocab_size), counts)
    assert DFlareDraftModel.from_pretrained(tmp_path / "draft").draft_vocab_ids is None
    assert "gen-data" in _cli_error(args[:2] + [str(tmp_path / "draft")] + args[3:], capsys)
    with pytest.raises(ValueError, match="made for another target"):
        response_token_counts(tiny_data, 100)
