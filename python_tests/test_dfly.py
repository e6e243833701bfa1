"""DFly drafts (AngelSpec's ``Qwen3DFlyModel``): the checkpoint format, the forward and the
correction head's sequential drafting against a plain re-derivation of DFly's math, and the
loader's refusals. Lossless decoding with DFly drafts is in test_engine.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig

H, HEADS, KVH, HD, FF, D, T, V, L = 64, 4, 2, 16, 96, 2, 3, 101, 12
THETA, EPS = 10000.0, 1e-6
IDS = [1, 4, 8]


def dfly_config(**overrides) -> dict:
    """A config.json laid out as AngelSpec's dfly_*_draft_config.json (small shapes)."""
    config = {
        "architectures": ["Qwen3DFlyModel"],
        "model_type": "qwen3",
        "hidden_size": H,
        "intermediate_size": FF,
        "head_dim": HD,
        "num_hidden_layers": D,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KVH,
        "vocab_size": V,
        "rms_norm_eps": EPS,
        "max_position_embeddings": 512,
        "rope_theta": THETA,
        "num_target_layers": T,
        "target_hidden_size": H,
        "target_num_hidden_layers": L,
        "target_layer_ids": IDS,
        "mask_token_id": V - 1,
        "tie_word_embeddings": False,
        "enable_hidden_correction": True,
        "hidden_correction_intermediate_size": None,
    }
    config.update(overrides)
    return config


def dfly_tensors(seed: int = 0, correction_width: int = H) -> dict[str, torch.Tensor]:
    """Random weights under DFly's tensor names (as AngelSpec's DFlyDraftModel names them)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None, offset=0.0):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return torch.randn(*shape, generator=g) * scale + offset

    w = {
        "context_proj.weight": r(H, T * H),
        "context_norm.weight": r(H, scale=0.1, offset=1.0),
        "final_norm.weight": r(H, scale=0.1, offset=1.0),
        "layer_fusion_weights": r(D, T, scale=1.0),
        "embed_tokens.weight": r(V, H, scale=1.0),
        "hidden_correction.hidden_norm.weight": r(H, scale=0.1, offset=1.0),
        "hidden_correction.embed_norm.weight": r(H, scale=0.1, offset=1.0),
        "hidden_correction.gate_proj.weight": r(correction_width, 2 * H),
        "hidden_correction.up_proj.weight": r(correction_width, 2 * H),
        "hidden_correction.down_proj.weight": r(H, correction_width),
    }
    for d in range(D):
        p = f"layers.{d}."
        w |= {
            p + "self_attn.q_proj.weight": r(HEADS * HD, H),
            p + "self_attn.k_proj.weight": r(KVH * HD, H),
            p + "self_attn.v_proj.weight": r(KVH * HD, H),
            p + "self_attn.o_proj.weight": r(H, HEADS * HD),
            p + "self_attn.q_norm.weight": r(HD, scale=0.1, offset=1.0),
            p + "self_attn.k_norm.weight": r(HD, scale=0.1, offset=1.0),
            p + "mlp.gate_proj.weight": r(FF, H),
            p + "mlp.up_proj.weight": r(FF, H),
            p + "mlp.down_proj.weight": r(H, FF),
            p + "input_layernorm.weight": r(H, scale=0.1, offset=1.0),
            p + "post_attention_layernorm.weight": r(H, scale=0.1, offset=1.0),
        }
    return w


def write_dfly(path, config: dict, tensors: dict[str, torch.Tensor]):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# --- DFly's math, written out from the description (AngelSpec's draft/dfly.py, dflash.py) -----


def norm(x, w):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rotate(x, pos):
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2).float() / HD)
    ang = pos[..., None].float() * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = torch.cat([-x[..., HD // 2 :], x[..., : HD // 2]], -1)
    return x * cos[:, :, None] + half * sin[:, :, None]  # x [b, s, heads, hd]


def dfly_backbone(w, hs, block_emb, ctx_pos, block_pos):
    """hs [b, C, T, H] -> draft states [b, q, H]: per-layer context norm(fc(cat) + mix)."""
    b, c = hs.shape[:2]
    q = block_emb.shape[1]
    base = hs.flatten(2) @ w["context_proj.weight"].T
    x = block_emb
    for d in range(D):
        p = f"layers.{d}."
        probs = torch.softmax(w["layer_fusion_weights"][d], -1)
        ctx = norm(base + torch.einsum("t,bcth->bch", probs, hs), w["context_norm.weight"])
        h = norm(x, w[p + "input_layernorm.weight"])
        qh = norm((h @ w[p + "self_attn.q_proj.weight"].T).view(b, q, HEADS, HD),
                  w[p + "self_attn.q_norm.weight"])
        kv_in = torch.cat([ctx, h], 1)  # DFlash: one k_proj / v_proj for context and block
        k = norm((kv_in @ w[p + "self_attn.k_proj.weight"].T).view(b, c + q, KVH, HD),
                 w[p + "self_attn.k_norm.weight"])
        v = (kv_in @ w[p + "self_attn.v_proj.weight"].T).view(b, c + q, KVH, HD)
        qh = rotate(qh, block_pos)
        k = rotate(k, torch.cat([ctx_pos, block_pos], 1))
        k, v = (t.repeat_interleave(HEADS // KVH, dim=2) for t in (k, v))
        scores = torch.einsum("bqnd,bknd->bnqk", qh, k) / math.sqrt(HD)
        attn = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, q, HEADS * HD)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        ff = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + ff @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["final_norm.weight"])


def dfly_sequential_draft(w, states, anchor, lm_head):
    """Slots 1..q-1: h' = h + down(silu(gate(c)) * up(c)), c = [norm(h); norm(E[prev])]."""
    prev, out = anchor, []
    for i in range(1, states.shape[1]):
        h = states[:, i]
        c = torch.cat([
            norm(h, w["hidden_correction.hidden_norm.weight"]),
            norm(w["embed_tokens.weight"][prev], w["hidden_correction.embed_norm.weight"]),
        ], -1)
        gate = F.silu(c @ w["hidden_correction.gate_proj.weight"].T)
        h = h + (gate * (c @ w["hidden_correction.up_proj.weight"].T)) @ w[
            "hidden_correction.down_proj.weight"
        ].T
        prev = (h @ lm_head.T).argmax(-1)
        out.append(prev)
    return torch.stack(out, 1)


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    w = dfly_tensors()
    return write_dfly(tmp_path / "dfly", dfly_config(), w), w


def test_config_reads_dflys_layout(checkpoint):
    path, _ = checkpoint
    cfg = DraftConfig.from_dict(json.loads((path / "config.json").read_text()))
    assert cfg.fusion == "dfly" and cfg.hidden_correction
    assert cfg.target_layer_ids == IDS and cfg.mask_token_id == V - 1
    # DFly's num_target_layers counts captured layers; the target's depth is elsewhere.
    assert cfg.num_captured_layers == T and cfg.num_target_layers == L
    assert cfg.block_size == 8  # the published "-B8" checkpoints' block; none in config.json
    draft = DFlareDraftModel(cfg)
    draft.check_compatible(Qwen3Config(hidden_size=H, num_hidden_layers=L, vocab_size=V))
    with pytest.raises(ValueError, match="trained on a 12-layer target"):
        draft.check_compatible(Qwen3Config(hidden_size=H, num_hidden_layers=L + 2, vocab_size=V))


def test_forward_matches_dfly_math(checkpoint):
    path, w = checkpoint
    draft = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    b, c, q = 2, 11, 8
    hs = torch.randn(b, c, T, H, generator=g)
    block = torch.randn(b, q, H, generator=g)
    ctx_pos = torch.arange(c).expand(b, c)
    block_pos = c + torch.arange(q).expand(b, q)
    with torch.no_grad():
        ours = draft(
            position_ids=torch.cat([ctx_pos, block_pos], 1), noise_embedding=block, target_hidden=hs
        )
    expected = dfly_backbone(w, hs, block, ctx_pos, block_pos)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_sequential_drafting_matches_dfly_math(checkpoint):
    path, w = checkpoint
    draft = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    states = torch.randn(5, 8, H, generator=g)
    anchor = torch.randint(0, V, (5,), generator=g)
    lm_head = torch.randn(V, H, generator=g)
    with torch.no_grad():
        ours = draft.draft_tokens(
            states, anchor, lambda ids: w["embed_tokens.weight"][ids], lambda s: (s @ lm_head.T).argmax(-1)
        )
    expected = dfly_sequential_draft(w, states, anchor, lm_head)
    assert torch.equal(ours, expected)
    # The correction matters: without it the picks differ (else this test shows nothing).
    assert not torch.equal(ours, (states[:, 1:] @ lm_head.T).argmax(-1))


def test_round_trip_in_dflys_names(tmp_path, checkpoint):
    path, w = checkpoint
    draft = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    draft.save_pretrained(tmp_path / "again", embedding=w["embed_tokens.weight"])
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert saved.keys() == w.keys()
    for k in w:
        assert torch.equal(saved[k], w[k]), k
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DFlyModel"]
    assert (config["num_target_layers"], config["target_num_hidden_layers"]) == (T, L)
    assert config["target_layer_ids"] == IDS and "dflash_config" not in config


def test_exported_embedding_is_checked_against_the_target(checkpoint):
    path, w = checkpoint
    draft = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    draft.check_target_embedding(w["embed_tokens.weight"].bfloat16().float())  # bf16 rounding
    assert draft.exported_embedding is None  # dropped once checked
    other = DFlareDraftModel.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="trained for another target"):
        other.check_target_embedding(w["embed_tokens.weight"] + 0.5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda w: w.pop("hidden_correction.down_proj.weight"), "missing: hidden_correction"),
        (
            lambda w: w.update({"hidden_correction.up_proj.weight": torch.zeros(H, H)}),
            r"wrong shape: hidden_correction.up_proj.weight \(64, 64\)",
        ),
        (lambda w: w.update({"fc.weight": w.pop("context_proj.weight")}), "unexpected: fc.weight"),
    ],
)
def test_malformed_checkpoints_are_refused(tmp_path, change, message):
    w = dfly_tensors()
    change(w)
    path = write_dfly(tmp_path / "bad", dfly_config(), w)
    with pytest.raises(ValueError, match=message) as e:
        DFlareDraftModel.from_pretrained(path)
    assert str(path) in str(e.value) and "Qwen3DFlyModel" in str(e.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_target_layers": 4}, "num_target_layers 4 .* != len\\(target_layer_ids\\) 3"),
        ({"target_hidden_size": 2 * H}, "target_hidden_size 128 must equal hidden_size 64"),
        ({"hidden_correction_type": "mlp"}, "hidden_correction_type='mlp' is not supported"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        DraftConfig.from_dict(dfly_config(**overrides))


def test_correction_width_and_disabled_head(tmp_path):
    cfg = DraftConfig.from_dict(dfly_config(hidden_correction_intermediate_size=32))
    assert DFlareDraftModel(cfg).hidden_correction.gate_proj.weight.shape == (32, 2 * H)
    cfg = DraftConfig.from_dict(dfly_config(enable_hidden_correction=False))
    assert DFlareDraftModel(cfg).hidden_correction is None
