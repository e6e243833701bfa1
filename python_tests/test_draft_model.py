"""The draft model on its own: cached inference path, config, init, checkpoint IO, errors.

Parity with the reference implementations is in test_reference_parity.py. Everything runs
in float32 on tiny configs; exact paths are compared to 1e-5 (max abs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from dflare_sgl.draft_model import (
    DFlareDraftModel,
    DraftConfig,
    capture_target_hidden,
    default_target_layer_ids,
)
from dflare_sgl.layer_mix import layer_mix_kv_reference

ATOL = 1e-5


def _target(**overrides) -> Qwen3Config:
    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
    }
    return Qwen3Config(**{**settings, **overrides})


def _draft(fusion: str = "layerwise", layers: int = 3, captured: int = 5, seed: int = 0, **kw):
    config = DraftConfig.for_target(
        _target(**kw),
        num_draft_layers=layers,
        fusion=fusion,
        num_captured_layers=captured,
        block_size=4,
    )
    return DFlareDraftModel(config, generator=torch.Generator().manual_seed(seed)).eval()


# ---------------------------------------------------------------------------------------
# The cached inference path


@pytest.mark.parametrize(
    "fusion,bias", [("layerwise", False), ("shared", False), ("layerwise", True)]
)
@torch.no_grad()
def test_draft_block_equals_forward(fusion, bias):
    """Batched blocks over ragged contexts scattered in a paged cache == per-request forward."""
    draft = _draft(fusion, attention_bias=bias)
    cfg, gen = draft.config, torch.Generator().manual_seed(1)
    ctx_lens, starts, q = [5, 9, 1], [0, 20, 7], 4
    num_slots, c = 64, max(ctx_lens)
    # Stale values in every slot: only the mask may keep them out of the result.
    shape = (num_slots, cfg.num_key_value_heads, cfg.head_dim)
    k_caches = [torch.randn(shape, generator=gen) for _ in range(cfg.num_hidden_layers)]
    v_caches = [torch.randn(shape, generator=gen) for _ in range(cfg.num_hidden_layers)]
    layout = torch.randperm(num_slots, generator=gen)
    ctx_slots = torch.zeros(len(ctx_lens), c, dtype=torch.int64)  # padding rows -> slot 0
    noise = torch.randn(len(ctx_lens), q, cfg.hidden_size, generator=gen)
    expected, positions = [], []
    mix = draft.layer_mix_weights()
    for i, (n, start) in enumerate(zip(ctx_lens, starts, strict=True)):
        hidden = torch.randn(1, n, cfg.num_captured_layers, cfg.hidden_size, generator=gen)
        pos = torch.arange(start, start + n + q)[None]
        slots, layout = layout[:n], layout[n:]
        ctx_slots[i, :n] = slots
        layer_mix_kv_reference(hidden[0], mix, pos[0, :n], slots, k_caches, v_caches)
        expected.append(
            draft(position_ids=pos, noise_embedding=noise[i : i + 1], target_hidden=hidden)
        )
        positions.append(pos[0, n:])
    out = draft.draft_block(
        noise, torch.stack(positions), k_caches, v_caches, ctx_slots, torch.tensor(ctx_lens)
    )
    torch.testing.assert_close(out, torch.cat(expected), atol=ATOL, rtol=0)


def test_capture_target_hidden_stacks_layers_after_the_embedding():
    hs = tuple(torch.full((2, 3, 4), float(i)) for i in range(6))  # hs[0] = embeddings
    out = capture_target_hidden(hs, [0, 2, 4])
    assert out.shape == (2, 3, 3, 4)
    assert out[0, 0, :, 0].tolist() == [1.0, 3.0, 5.0]


def test_forward_accepts_stacked_target_hidden():
    draft = _draft()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 5, 64, generator=gen)
    noise = torch.randn(2, 4, 64, generator=gen)
    pos = torch.arange(7)[None]
    torch.testing.assert_close(
        draft(pos, noise_embedding=noise, target_hidden=hidden),
        draft(pos, noise_embedding=noise, target_hidden=hidden.flatten(-2)),
    )


# ---------------------------------------------------------------------------------------
# Config


def test_default_target_layer_ids_design_examples():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3 36L, DFlash
    assert default_target_layer_ids(36, 9) == [1, 5, 9, 13, 17, 21, 25, 29, 33]  # DFlare T=9
    assert default_target_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_target_layer_ids(36, 1) == [18]
    with pytest.raises(ValueError, match="k >= 1"):
        default_target_layer_ids(36, 0)


def _config_dict(arch: str, **changes) -> dict:
    d = {
        "architectures": [arch],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "num_target_layers": 36,
        "dflash_config": {"mask_token_id": 99},
    }
    d.update(changes)
    return d


def test_from_dict_detects_format_and_defaults():
    dflash = DraftConfig.from_dict(_config_dict("DFlashDraftModel"))
    assert dflash.fusion == "shared"
    assert dflash.target_layer_ids == default_target_layer_ids(36, 3)  # k = D
    assert dflash.block_size == 16 and dflash.mask_token_id == 99
    dflare = DraftConfig.from_dict(
        _config_dict(
            "QwenDFlareDraftModel", block_size=8, dflash_config={"target_layer_ids": [1, 2]}
        )
    )
    assert (
        dflare.fusion == "layerwise"
        and dflare.target_layer_ids == [1, 2]
        and dflare.block_size == 8
    )
    nested = DraftConfig.from_dict(
        _config_dict("DFlashDraftModel", dflash_config={"block_size": 10, "mask_token_id": 5})
    )
    assert nested.block_size == 10


def test_to_dict_round_trips_unknown_keys_and_rope_spellings():
    raw = _config_dict(
        "QwenDFlareDraftModel",
        rope_scaling={"type": "linear", "factor": 2.0},
        my_training_note="kept",
        dflash_config={"mask_token_id": 7, "target_layer_ids": [1, 3], "extra": 1},
    )
    config = DraftConfig.from_dict(raw)
    assert config.rope_parameters["rope_type"] == "linear"
    out = config.to_dict(dtype=torch.bfloat16)
    assert out["my_training_note"] == "kept" and out["dflash_config"]["extra"] == 1
    assert out["dtype"] == "bfloat16" and out["model_type"] == "qwen3"
    again = DraftConfig.from_dict(out)
    assert again.to_dict(dtype=torch.bfloat16) == out
    assert again.rope_parameters == config.rope_parameters


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_theta": 10000.0},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},  # transformers 4 spelling
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
)
def test_rope_cache_matches_hf_rotary_embedding(rope):
    hf_config = Qwen3Config(**_config_dict("DFlashDraftModel", **rope))
    table = DraftConfig.from_dict(hf_config.to_dict()).rope_cache()
    positions = torch.arange(128)[None]
    cos, sin = Qwen3RotaryEmbedding(hf_config)(torch.ones(1, dtype=torch.float32), positions)
    half = table.shape[-1] // 2
    torch.testing.assert_close(table[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)


def test_for_target_sizes_the_draft_from_the_target():
    target = _target(num_hidden_layers=36, rms_norm_eps=1e-5, rope_theta=5e5)
    config = DraftConfig.for_target(target, num_draft_layers=5, fusion="shared")
    assert config.target_layer_ids == [1, 9, 17, 25, 33] and config.num_target_layers == 36
    assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (64, 16, 2)
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 5e5
    assert config.mask_token_id == 99  # vocab_size - 1
    wide = DraftConfig.for_target(
        target, num_draft_layers=7, num_captured_layers=9, mask_token_id=3
    )
    assert (
        wide.fusion == "layerwise" and len(wide.target_layer_ids) == 9 and wide.mask_token_id == 3
    )


# ---------------------------------------------------------------------------------------
# Init


def test_dflare_init():
    draft = _draft("layerwise", layers=3, captured=5, seed=0)
    expected = torch.zeros(3, 5)
    expected[0, 0] = expected[1, 1] = expected[2, 3] = 2.0  # W[d, floor(d*T/D)] = 2
    torch.testing.assert_close(draft.layer_fusion_weights.data, expected, atol=0, rtol=0)
    probs = draft.layer_mix_weights().fusion_probs
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    attn = draft.layers[0].self_attn
    assert torch.equal(attn.q_norm.weight, torch.ones(16)) and torch.equal(
        draft.norm.weight, torch.ones(64)
    )
    # 128*64 samples of N(0, 0.02): the sample std is within 5% with overwhelming probability.
    std = draft.layers[0].mlp.gate_proj.weight.std().item()
    assert abs(std - 0.02) < 0.001
    same_seed = _draft(seed=0).layers[1].self_attn.k_proj_target.weight
    assert torch.equal(same_seed, draft.layers[1].self_attn.k_proj_target.weight)
    assert not torch.equal(
        _draft(seed=1).layers[0].mlp.gate_proj.weight, draft.layers[0].mlp.gate_proj.weight
    )


def test_parameter_names_are_the_checkpoint_keys():
    layerwise = set(_draft("layerwise", layers=1, attention_bias=True).state_dict())
    shared = set(_draft("shared", layers=1).state_dict())
    attn = "layers.0.self_attn."
    assert {
        f"{attn}k_proj_target.weight",
        f"{attn}v_proj_target.bias",
        "layer_fusion_weights",
    } <= layerwise
    assert "fc.weight" in shared and not any("target" in k for k in shared)
    common = {
        "norm.weight",
        "hidden_norm.weight",
        f"{attn}q_norm.weight",
        f"{attn}k_norm.weight",
        "layers.0.mlp.down_proj.weight",
        "layers.0.post_attention_layernorm.weight",
    }
    assert common <= layerwise and common <= shared


# ---------------------------------------------------------------------------------------
# Checkpoint IO


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
@torch.no_grad()
def test_save_load_round_trip(fusion, tmp_path):
    draft = _draft(fusion)
    draft.save_pretrained(tmp_path)
    # Readable by every user (a server or a container may run as another user); safetensors
    # alone would write the weights 0600.
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    loaded = DFlareDraftModel.from_pretrained(tmp_path)
    assert loaded.config.to_dict(torch.float32) == draft.config.to_dict(torch.float32)
    for (k, a), (k2, b) in zip(
        draft.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    kwargs = {
        "position_ids": torch.arange(9)[None],
        "noise_embedding": torch.randn(1, 4, 64, generator=gen),
        "target_hidden": torch.randn(1, 5, 5 * 64, generator=gen),
    }
    torch.testing.assert_close(loaded(**kwargs), draft(**kwargs), atol=0, rtol=0)


def test_load_dtype_and_sharded_index(tmp_path):
    draft = _draft("shared").to(torch.bfloat16)
    draft.save_pretrained(tmp_path / "single")
    loaded = DFlareDraftModel.from_pretrained(tmp_path / "single")
    assert loaded.norm.weight.dtype == torch.bfloat16  # recorded in config.json
    assert loaded.layer_mix_weights().cos_sin_cache.dtype == torch.float32
    # Split into two shards with an index, as HF writes large checkpoints.
    state = load_file(tmp_path / "single" / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, sharded / name, metadata={"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = DFlareDraftModel.from_pretrained(sharded, dtype=torch.float32)
    assert loaded.norm.weight.dtype == torch.float32
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k].float())


# ---------------------------------------------------------------------------------------
# Errors users can hit


def _saved(tmp_path: Path) -> Path:
    _draft("layerwise").save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(path: Path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@torch.no_grad()
def test_draft_vocab_saves_loads_and_survives_dtype_casts(tmp_path):
    draft = _draft("shared")
    assert draft.draft_vocab_ids is None and "draft_vocab_ids" not in draft.state_dict()
    ids = torch.tensor([7, 3, 99, 0, 42])  # any order: the head reads rows in this order
    draft.set_draft_vocab(ids)
    draft = draft.to(torch.bfloat16)
    assert draft.draft_vocab_ids.dtype == torch.int64
    draft.save_pretrained(tmp_path / "reduced")
    assert json.loads((tmp_path / "reduced" / "config.json").read_text())["draft_vocab_size"] == 5
    loaded = DFlareDraftModel.from_pretrained(tmp_path / "reduced")
    assert torch.equal(loaded.draft_vocab_ids, ids) and loaded.config.draft_vocab_size == 5
    assert loaded.norm.weight.dtype == torch.bfloat16
    # Every token again: the published layout, without the tensor or the config key.
    loaded.set_draft_vocab(torch.arange(100))
    assert loaded.draft_vocab_ids is None and loaded.config.draft_vocab_size is None
    loaded.save_pretrained(tmp_path / "full")
    assert "draft_vocab_size" not in json.loads((tmp_path / "full" / "config.json").read_text())
    assert "draft_vocab_ids" not in load_file(tmp_path / "full" / "model.safetensors")


def test_error_bad_draft_vocab(tmp_path):
    draft = _draft()
    for bad, match in [
        (torch.tensor([1, 1, 2]), "distinct"),
        (torch.tensor([5, 100]), r"\[0, 100\)"),
        (torch.tensor([[1, 2]]), "1-D"),
        (torch.tensor([1.0, 2.0]), "1-D tensor of token ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            draft.set_draft_vocab(bad)
    draft.set_draft_vocab(torch.tensor([4, 5, 6]))
    draft.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update(draft_vocab_ids=torch.tensor([4, 5, 500])))
    with pytest.raises(ValueError, match=r"draft_vocab_ids in .*\[0, 100\)"):
        DFlareDraftModel.from_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("draft_vocab_ids"))
    with pytest.raises(ValueError, match="missing: draft_vocab_ids"):
        DFlareDraftModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="draft_vocab_size 200 must be in"):
        DraftConfig.from_dict(_config_dict("DFlashDraftModel", draft_vocab_size=200))


def test_error_unknown_architecture():
    with pytest.raises(ValueError, match=r"QwenDFlareDraftModel.*DFlashDraftModel"):
        DraftConfig.from_dict(_config_dict("LlamaForCausalLM"))


def test_error_unsupported_settings():
    with pytest.raises(ValueError, match="hidden_act"):
        DraftConfig.from_dict(_config_dict("DFlashDraftModel", hidden_act="gelu"))
    with pytest.raises(ValueError, match="sliding"):
        DraftConfig.from_dict(
            _config_dict("DFlashDraftModel", use_sliding_window=True, max_window_layers=1)
        )
    with pytest.raises(ValueError, match="neither target_layer_ids nor"):
        DraftConfig.from_dict(_config_dict("DFlashDraftModel", num_target_layers=None))
    with pytest.raises(ValueError, match="output_multiplier"):
        DraftConfig.from_dict(_config_dict("DFlashDraftModel", output_multiplier=2.0))
    # Layouts SGLang's DFlash layers read from a config and layer_mix_kv does not implement.
    for layout in ({"rope_is_neox_style": False}, {"is_neox_style": False}):
        with pytest.raises(ValueError, match="neox_style=False is not supported"):
            DraftConfig.from_dict(_config_dict("QwenDFlareDraftModel", **layout))
    with pytest.raises(ValueError, match="use_gemma_norm=True is not supported"):
        DraftConfig.from_dict(_config_dict("Qwen3DFlyModel", use_gemma_norm=True))


def test_error_missing_key(tmp_path):
    path = _saved(tmp_path)
    _rewrite_weights(path, lambda s: s.pop("layers.1.self_attn.k_proj_target.weight"))
    with pytest.raises(
        ValueError, match=r"DFlare.*missing: layers\.1\.self_attn\.k_proj_target\.weight"
    ):
        DFlareDraftModel.from_pretrained(path)


def test_error_unexpected_key(tmp_path):
    path = _saved(tmp_path)
    _rewrite_weights(path, lambda s: s.update({"fc.weight": torch.zeros(64, 320)}))
    with pytest.raises(ValueError, match=r"unexpected: fc\.weight"):
        DFlareDraftModel.from_pretrained(path)


def test_error_wrong_shape(tmp_path):
    path = _saved(tmp_path)
    _rewrite_weights(path, lambda s: s.update({"layer_fusion_weights": torch.zeros(3, 4)}))
    with pytest.raises(
        ValueError, match=r"wrong shape: layer_fusion_weights \(3, 4\) \(expected \(3, 5\)\)"
    ):
        DFlareDraftModel.from_pretrained(path)


def test_error_corrupt_or_absent_weights(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        DFlareDraftModel.from_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DFlareDraftModel.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        DFlareDraftModel.from_pretrained(path)


def test_check_compatible():
    draft = _draft()  # sized for _target(): 12 layers, hidden 64, vocab 100, mask id 99
    draft.check_compatible(_target())
    with pytest.raises(ValueError, match="hidden_size 64 != target hidden_size 128"):
        draft.check_compatible(_target(hidden_size=128))
    with pytest.raises(ValueError, match="mask_token_id 99 is not inside the target vocab"):
        draft.check_compatible(_target(vocab_size=50))
    with pytest.raises(ValueError, match="12-layer target"):
        draft.check_compatible(_target(num_hidden_layers=8))
    draft.config.num_target_layers = None  # a checkpoint that does not record L
    with pytest.raises(ValueError, match=r"target_layer_ids \[9\] are outside"):
        draft.check_compatible(_target(num_hidden_layers=8))
    with pytest.raises(ValueError, match="outside the target vocab"):
        DraftConfig.for_target(_target(), num_draft_layers=1, mask_token_id=100)


def test_error_target_hidden_width():
    draft = _draft()
    with pytest.raises(ValueError, match=r"T=5 target layers of H=64"):
        draft(
            torch.arange(5)[None],
            noise_embedding=torch.zeros(1, 2, 64),
            target_hidden=torch.zeros(1, 3, 4 * 64),
        )
