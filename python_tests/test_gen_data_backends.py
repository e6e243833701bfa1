"""``gen-data --backend sglang|URL``: regeneration by a real SGLang server (started by gen-data
in its own process group on CPU, killed afterwards) writes the same greedy data as HF
``generate``; misuse is refused with the fix named (tiny random Llama target)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training_run import _gen_config, _tiny_target

from dflare_sgl.sglang_plugin.server_process import free_port
from dflare_sgl.training.data import read_metadata
from dflare_sgl.training.generate import generate_data


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, smollm2_dir) -> str:
    return str(_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir))


def test_sglang_backend_matches_hf_greedy(tmp_path, tiny_target):
    """12 prompts in 2 shards, greedy float32: every shard byte for byte the HF backend's (a
    response ends with its stop token in both); the metadata records the engine."""
    hf = generate_data(_gen_config(tiny_target, tmp_path / "hf"))
    sglang = generate_data(_gen_config(tiny_target, tmp_path / "sglang", backend="sglang"))
    shards = sorted(p.name for p in hf.glob("shard-*.jsonl"))
    assert len(shards) == 2 and shards == sorted(p.name for p in sglang.glob("shard-*.jsonl"))
    for name in shards:
        assert (sglang / name).read_bytes() == (hf / name).read_bytes()
    assert read_metadata(sglang)["settings"]["backend"] == "sglang"
    assert "backend" not in read_metadata(hf)["settings"]


def test_backend_misuse(tmp_path, tiny_target):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="no SGLang server answers there"):
        generate_data(_gen_config(tiny_target, tmp_path / "a", backend=url))
    with pytest.raises(ValueError, match="use --backend hf"):
        cfg = _gen_config(tiny_target, tmp_path / "b", backend="sglang", responses="labelled")
        generate_data(cfg)
    assert not Path(tmp_path / "b").exists()
