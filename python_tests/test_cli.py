"""The ``dflare`` command, run as a user runs it: in a subprocess, on the real SmolLM2 target.

Outputs are checked against the target's own greedy decoding, and every error a user can
cause must end in one ``dflare: error: ...`` line with exit status 2, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from dflare_sgl.cli_helpers import TextStream

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
SMALL_DRAFT = ["--target", "smollm2-135m", "--layers", "1", "--block-size", "4"]


def dflare(*args: str) -> subprocess.CompletedProcess:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "dflare_sgl.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def drafts(smollm2_dir, tmp_path_factory):
    """Untrained drafts for SmolLM2 written by ``dflare init-draft``, one per format."""
    out = {}
    for fusion in ("layerwise", "shared"):
        path = tmp_path_factory.mktemp(fusion)
        run = dflare("init-draft", "--out", str(path), "--fusion", fusion, *SMALL_DRAFT)
        assert run.returncode == 0, run.stderr
        out[fusion] = path
    return out


@pytest.mark.parametrize("command", [[], ["generate"], ["init-draft"], ["draft-vocab"]])
def test_help(command):
    run = dflare(*command, "--help")
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.startswith(f"usage: dflare {' '.join(command)}".rstrip())


def test_init_draft_writes_the_published_formats(drafts):
    arch = {"layerwise": "QwenDFlareDraftModel", "shared": "DFlashDraftModel"}
    for fusion, path in drafts.items():
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == [arch[fusion]]
        assert config["num_hidden_layers"] == 1 and config["block_size"] == 4
        assert config["num_target_layers"] == 30
        assert 0 <= config["dflash_config"]["mask_token_id"] < 49152
        assert (path / "model.safetensors").is_file()


def _target_greedy(target, text: str, max_new_tokens: int) -> str:
    model, tok = target
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_with_draft_equals_target_greedy(drafts, smollm2_target):
    # The DFlash-format draft here; the untrained default draft below is DFlare-format.
    args = ["--draft", str(drafts["shared"]), "--prompt", QUESTION, "--max-new-tokens", "5"]
    args += ["--block-size", "3"]
    run = dflare("generate", "--target", "smollm2-135m", *args)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "untrained" not in run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "=== request 1/1 ==="
    # Streamed text, then the per-request stats line.
    assert lines[1] == _target_greedy(smollm2_target, QUESTION, 5)
    stats = re.fullmatch(
        r"--- 5 tokens \(length\), [\d.]+ tok/s \| tau ([\d.]+) over (\d+) steps \| "
        r"drafted (\d+), accepted (\d+) \([\d.]+%\) \| verified n=3 100%",
        lines[2],
    )
    assert stats, lines[2]
    tau, steps, drafted, accepted = float(stats[1]), *map(int, stats.group(2, 3, 4))
    # --block-size 3: 2 drafts per step.
    assert drafted == 2 * steps
    assert tau == round(4 / steps, 2)  # 5 tokens, the first from prefill, 4 from the steps
    assert accepted <= 4 - steps  # each step commits its accepted drafts plus one token
    assert lines[3].startswith("=== all 1 request(s): 5 tokens in ")


def test_generate_prompt_set_batched_with_untrained_draft(smollm2_dir):
    # A target given as a folder has no bundled draft (only built-in aliases do).
    args = "--prompts mtbench --limit 2 --max-new-tokens 2 --block-size 4 --temperature 0.8"
    target = ["--target", str(smollm2_dir)]
    run = dflare("generate", *target, *args.split(), "--top-k", "50", "--top-p", "0.9")
    assert run.returncode == 0, run.stderr
    warning = "dflare: warning: no --draft given and no draft ships for this target: using an "
    assert warning + "untrained (random) draft" in run.stderr
    assert "Traceback" not in run.stderr
    headers = [line for line in run.stdout.splitlines() if line.startswith("=== request")]
    assert headers == ["=== request 1/2 ===", "=== request 2/2 ==="]
    assert run.stdout.count("--- 2 tokens (length)") == 2
    assert "=== all 2 request(s): 4 tokens in " in run.stdout


def test_text_stream_matches_the_full_decode(smollm2_target):
    _, tok = smollm2_target
    text = "Naïve café: 😀 ok, 東京 done."
    tokens = tok.encode(text, add_special_tokens=False)
    out = io.StringIO()
    stream = TextStream(tok, out)
    pieces = []
    for t in tokens:  # one token per commit splits the multi-byte characters
        before = out.tell()
        stream(0, [t])
        pieces.append(out.getvalue()[before:])
    assert out.getvalue() == tok.decode(tokens) == text
    assert "\ufffd" not in "".join(pieces)


@pytest.fixture(scope="module")
def bad_inputs(drafts, tmp_path_factory):
    """Paths for each user error: an empty folder, a truncated draft and a foreign draft."""
    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty"
    empty.mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((drafts["layerwise"] / "config.json").read_text())
    weights = (drafts["layerwise"] / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    # A draft made by `dflare init-draft` for another (tiny) target: valid, but not for SmolLM2.
    tiny = root / "tiny_target"
    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    small.save_pretrained(tiny)
    foreign = root / "foreign_draft"
    run = dflare("init-draft", "--target", str(tiny), "--out", str(foreign), "--layers", "1")
    assert run.returncode == 0, run.stderr
    return {"empty": empty, "corrupt": corrupt, "foreign": foreign}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "/no/such/model"], "is neither a built-in alias"),
        (["--target", "{empty}"], "has no config.json"),
        (["--draft", "{empty}"], "config.json not found"),
        (["--draft", "{corrupt}"], "cannot read draft weights"),
        (["--draft", "{foreign}"], "draft hidden_size 64 != target hidden_size 576"),
        (["--prompts", "gsm8k"], "unknown prompt set 'gsm8k'"),
        (["--prompt", "hello " * 8200], "more than the 8192 the models support"),
    ],
    ids=[
        "target-path",
        "target-not-a-model",
        "draft-not-a-checkpoint",
        "draft-corrupt",
        "draft-mismatch",
        "prompt-set",
        "prompt-too-long",
    ],
)
def test_user_errors_are_one_line(bad_inputs, args, message):
    args = [a.format(**bad_inputs) for a in args]
    if "--prompt" not in args and "--prompts" not in args:
        args += ["--prompt", "hi"]
    run = dflare("generate", *args, "--max-new-tokens", "2")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("dflare: error: ")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert run.stdout == ""  # nothing was generated before the error
