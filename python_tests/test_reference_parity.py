"""Our draft model against the reference implementations, on the same random weights.

The references are the published code of both checkpoint formats: z-lab ``dflash`` 0.1.0
(``dflash/model.py``, DFlash) and AngelSlim 0.5.0 (``.../models/draft/qwen_dflare.py``,
DFlare). Each reference model is saved with its own ``save_pretrained`` (the published
format) and loaded with ours, and ours is saved and loaded back by the reference class; the
forward outputs must agree in float32 to 1e-5 (max abs, outputs are O(1) after the final norm).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import DynamicCache, Qwen3Config

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig

ATOL = 1e-5
H, HEADS, KV_HEADS, HEAD_DIM, VOCAB, MAX_POS, TARGET_LAYERS = 64, 4, 2, 16, 128, 256, 12


def _dflash_class() -> type:
    return pytest.importorskip(
        "dflash.model", reason="reference package dflash not installed"
    ).DFlashDraftModel


def _dflare_class() -> type:
    """AngelSlim's QwenDFlareDraftModel without running the heavy ``angelslim`` __init__ chain.

    The draft-model directory is registered as a bare package, so importing
    ``qwen_dflare`` from it runs only that file; its one relative import,
    ``.draft_model_factory``, then loads the real draft_model_factory.py from the same
    directory (it imports only json, torch and transformers).
    """
    spec = importlib.util.find_spec("angelslim")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("reference package angelslim not installed")
    name = "_angelslim_draft_models"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [
            str(Path(spec.origin).parent / "compressor/speculative/train/models/draft")
        ]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.qwen_dflare").QwenDFlareDraftModel


REFERENCES = {
    "layerwise": ("QwenDFlareDraftModel", _dflare_class),
    "shared": ("DFlashDraftModel", _dflash_class),
}


def _reference_model(
    fusion: str, num_layers: int, layer_ids: list[int], bias: bool, rope: dict, seed: int
):
    arch, load_class = REFERENCES[fusion]
    config = Qwen3Config(
        hidden_size=H,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        attention_bias=bias,
        attn_implementation="sdpa",
        **rope,
    )
    config.architectures = [arch]
    config.block_size = 8
    config.num_target_layers = TARGET_LAYERS
    config.dflash_config = {"mask_token_id": VOCAB - 3, "target_layer_ids": layer_ids}
    model = load_class()(config).float().eval()
    # Random values everywhere (norms and fusion logits too), so every weight matters.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model


class Case(NamedTuple):
    fusion: str
    layers: int  # D
    ids: list[int]  # target_layer_ids, T of them
    batch: int
    ctx: int
    q: int
    bias: bool = False
    rope: dict | None = None  # extra Qwen3Config rope settings; None: rope_theta 10000

    @property
    def rope_settings(self) -> dict:
        return self.rope or {"rope_theta": 10000.0}

    def __str__(self) -> str:
        shape = f"D{self.layers}-T{len(self.ids)}-b{self.batch}-ctx{self.ctx}-q{self.q}"
        extras = ("-bias" if self.bias else "") + (
            "-scaled" if "rope_scaling" in self.rope_settings else ""
        )
        return f"{self.fusion}-{shape}{extras}"


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
CASES = [
    Case("layerwise", 3, [0, 2, 4, 6, 8], batch=1, ctx=7, q=4),
    Case(
        "layerwise", 7, [1, 2, 3, 4, 5, 6, 7, 8, 9], batch=2, ctx=5, q=8, rope={"rope_theta": 1e6}
    ),
    Case("layerwise", 1, [6], batch=2, ctx=3, q=2, bias=True),
    Case("layerwise", 2, [1, 5, 9], batch=2, ctx=6, q=4, rope={"rope_scaling": YARN}),
    Case("shared", 3, [1, 5, 9], batch=2, ctx=6, q=4),
    Case("shared", 1, [6], batch=1, ctx=4, q=3),
    Case(
        "shared",
        2,
        [0, 3, 6, 9],
        batch=2,
        ctx=5,
        q=5,
        bias=True,
        rope={"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
    ),
]


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Case:
    return request.param


def _inputs(case: Case, seed: int, start: int = 0):
    """target_hidden [b, ctx, T*H], noise_embedding [b, q, H], position_ids [b, ctx+q]."""
    gen = torch.Generator().manual_seed(seed)
    target_hidden = torch.randn(case.batch, case.ctx, len(case.ids) * H, generator=gen)
    noise = torch.randn(case.batch, case.q, H, generator=gen)
    positions = torch.arange(start, start + case.ctx + case.q)[None].expand(case.batch, -1)
    return target_hidden, noise, positions


def _pair_from_reference(case: Case, tmp_path: Path):
    ref = _reference_model(
        case.fusion,
        case.layers,
        case.ids,
        case.bias,
        case.rope_settings,
        seed=case.layers + len(case.ids),
    )
    ref.save_pretrained(tmp_path)
    ours = DFlareDraftModel.from_pretrained(tmp_path).eval()
    return ref, ours


@torch.no_grad()
def test_forward_matches_reference(case, tmp_path):
    ref, ours = _pair_from_reference(case, tmp_path)
    assert ours.config.fusion == case.fusion and ours.target_layer_ids == case.ids
    assert ours.block_size == 8 and ours.mask_token_id == VOCAB - 3
    hidden, noise, positions = _inputs(case, seed=1, start=3)
    kwargs = {"position_ids": positions, "noise_embedding": noise, "target_hidden": hidden}
    torch.testing.assert_close(ours(**kwargs), ref(**kwargs), atol=ATOL, rtol=0)


@torch.no_grad()
def test_masked_forward_matches_reference(case, tmp_path):
    ref, ours = _pair_from_reference(case, tmp_path)
    hidden, noise, positions = _inputs(case, seed=2)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(case.batch, 1, case.q, case.ctx + case.q, generator=gen) < 0.6
    mask[..., case.ctx :] |= torch.eye(case.q, dtype=torch.bool)  # every query sees at least itself
    kwargs = {
        "position_ids": positions,
        "attention_mask": mask,
        "noise_embedding": noise,
        "target_hidden": hidden,
    }
    torch.testing.assert_close(ours(**kwargs), ref(**kwargs), atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_decoding_matches_reference(case, tmp_path):
    """Two drafting steps through an HF DynamicCache, cropped between them as the references'
    own generate loops do: the second step attends to the first step's cached context."""
    ref, ours = _pair_from_reference(case, tmp_path)
    caches = {"ref": DynamicCache(), "ours": DynamicCache()}
    start = 0
    for step, new_ctx in enumerate((case.ctx, 3)):
        hidden, noise, positions = _inputs(case._replace(ctx=new_ctx), seed=10 + step, start=start)
        outs = {}
        for name, model in (("ref", ref), ("ours", ours)):
            outs[name] = model(
                position_ids=positions,
                noise_embedding=noise,
                target_hidden=hidden,
                past_key_values=caches[name],
                use_cache=True,
            )
            caches[name].crop(-case.q)  # drop the block, keep the context (negative: 5.x API)
        torch.testing.assert_close(outs["ours"], outs["ref"], atol=ATOL, rtol=0)
        start += new_ctx


@torch.no_grad()
def test_reference_loads_our_checkpoint(case, tmp_path):
    _, ours = _pair_from_reference(case, tmp_path / "reference")
    ours.save_pretrained(tmp_path / "ours")
    _, load_class = REFERENCES[case.fusion]
    ref = load_class().from_pretrained(tmp_path / "ours", attn_implementation="sdpa").float().eval()
    assert ref.target_layer_ids == case.ids and ref.mask_token_id == VOCAB - 3
    hidden, noise, positions = _inputs(case, seed=4)
    kwargs = {"position_ids": positions, "noise_embedding": noise, "target_hidden": hidden}
    torch.testing.assert_close(ref(**kwargs), ours(**kwargs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_layers,num_captured", [(1, 1), (3, 5), (5, 5), (7, 9), (4, 2)])
def test_fusion_init_matches_angelslim(num_layers, num_captured):
    ids = list(range(num_captured))
    ref = _reference_model("layerwise", num_layers, ids, False, {"rope_theta": 1e4}, seed=0)
    ref._init_fusion_weights()
    ours = DFlareDraftModel(DraftConfig.from_dict(ref.config.to_dict()))
    torch.testing.assert_close(ours.layer_fusion_weights, ref.layer_fusion_weights, atol=0, rtol=0)
