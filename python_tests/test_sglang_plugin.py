"""The DFLARE plugin's registration and server-argument resolution, against real SGLang 0.5.23.

SGLang is imported in this process in CPU mode (the plugin's own recipe, ``cpu_compat``);
``ServerArgs.resolve_once()`` runs SGLang's whole resolution pipeline, which calls the
plugin's ``handle_server_args``. No engine is started here (see test_sglang_engine.py).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from transformers import AutoConfig

from dflare_sgl._ext import has_kernel
from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.sglang_plugin import cpu_compat


@pytest.fixture(scope="module")
def sglang_cpu():
    """SGLang imported in CPU mode with the plugins loaded (what every SGLang process does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGLANG_USE_CPU_ENGINE", "1")
        mp.syspath_prepend(str(cpu_compat.STANDIN_DIR))
        from sglang.srt.plugins import load_plugins

        load_plugins()
        yield sys.modules["sglang"]


@pytest.fixture(scope="module")
def draft_config(smollm2_dir, tmp_path_factory):
    """config.json dict of a 2-layer DFlare draft (block 8) for SmolLM2; the server
    arguments only read the config, so variants are written without weights."""
    folder = tmp_path_factory.mktemp("draft")
    config = DraftConfig.for_target(
        AutoConfig.from_pretrained(smollm2_dir), num_draft_layers=2, block_size=8
    )
    DFlareDraftModel(config, generator=torch.Generator().manual_seed(0)).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _resolve(sglang_cpu, target, draft_dir, **kwargs):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(
        model_path=str(target),
        device="cpu",
        speculative_algorithm="DFLARE",
        speculative_draft_model_path=None if draft_dir is None else str(draft_dir),
        **kwargs,
    )
    args.resolve_once()
    return resolved_view(args)


def _write(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("dflare") == "dflare_sgl.sglang_plugin:register"


def test_load_plugins_registers_dflare(sglang_cpu):
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from dflare_sgl.sglang_plugin.models.qwen_dflare import QwenDFlareDraftModel
    from dflare_sgl.sglang_plugin.spec import DFlareSpecAlgo
    from dflare_sgl.sglang_plugin.worker import DFlareWorker

    algo = SpeculativeAlgorithm.from_string("dflare")
    assert isinstance(algo, DFlareSpecAlgo)
    # What the scheduler and the DFlash machinery ask of it.
    assert algo.is_dflash() and algo.is_dflash_family() and algo.supports_overlap
    assert algo.supports_target_verify_for_draft() and not algo.need_topk()
    assert not algo.carries_draft_hidden_states() and not algo.is_eagle()
    assert callable(algo.create_future_map)
    assert algo.factory(None) is DFlareWorker
    cls, arch = ModelRegistry.resolve_model_cls(["QwenDFlareDraftModel"])
    assert cls is QwenDFlareDraftModel and arch == "QwenDFlareDraftModel"
    from dflare_sgl.sglang_plugin.models.qwen_dfly import Qwen3DFlyModel

    assert ModelRegistry.resolve_model_cls(["Qwen3DFlyModel"])[0] is Qwen3DFlyModel


def test_server_args_resolve_from_draft(sglang_cpu, smollm2_dir, draft_config, tmp_path):
    draft = _write(tmp_path, draft_config)
    cfg = _resolve(sglang_cpu, smollm2_dir, draft)
    assert cfg.speculative_num_draft_tokens == 8  # the draft's block_size
    assert (cfg.speculative_num_steps, cfg.speculative_eagle_topk) == (1, 1)
    assert cfg.speculative_draft_attention_backend == "torch_native"  # CPU default
    # --speculative-num-draft-tokens overrides the draft's block size.
    cfg = _resolve(sglang_cpu, smollm2_dir, draft, speculative_num_draft_tokens=5)
    assert cfg.speculative_num_draft_tokens == 5
    # The mask token and captured layers reach SGLang's DFlash machinery (the worker's mask
    # id, the target's hidden-state capture) from the same config, unchanged.
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config

    parsed = parse_dflash_draft_config(draft_hf_config=draft_config)
    assert parsed.mask_token_id == 49151 and parsed.target_layer_ids == [1, 27]


def test_server_args_resolve_from_a_dfly_draft(sglang_cpu, smollm2_dir, tmp_path):
    """A DFly config.json (no block_size; num_target_layers = the captured layers) serves at
    the published drafts' block of 8, and SGLang's DFlash parser sees its ids and mask."""
    config = DraftConfig.for_target(
        AutoConfig.from_pretrained(smollm2_dir), num_draft_layers=2, fusion="dfly"
    ).to_dict()
    config.pop("block_size")  # as published
    assert config["num_target_layers"] == 2 and config["target_num_hidden_layers"] == 30
    cfg = _resolve(sglang_cpu, smollm2_dir, _write(tmp_path, config))
    assert cfg.speculative_num_draft_tokens == 8
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config

    parsed = parse_dflash_draft_config(draft_hf_config=config)
    assert parsed.mask_token_id == 49151 and parsed.target_layer_ids == [1, 27]


def _dflash(config):
    config["architectures"] = ["DFlashDraftModel"]


def _hidden(config):
    config["hidden_size"] = 512


def _mask(config):
    config["dflash_config"]["mask_token_id"] = 49152


def _layers(config):
    config["dflash_config"]["target_layer_ids"] = [1, 30]


@pytest.mark.parametrize(
    "edit, kwargs, message",
    [
        (_dflash, {}, "--speculative-algorithm DFLASH"),
        (_hidden, {}, "draft hidden_size 512 != target hidden_size 576"),
        (_mask, {}, "mask_token_id 49152 is not inside the target vocab"),
        (_layers, {}, "target_layer_ids [30] are outside the target's layers"),
        (None, {"speculative_num_draft_tokens": 9}, "block size in [2, 8]"),
        (None, {"speculative_num_draft_tokens": 1}, "block size in [2, 8]"),
        (None, {"speculative_draft_window_size": 64}, "--speculative-draft-window-size"),
    ],
)
def test_impossible_combinations_name_the_fix(
    sglang_cpu, smollm2_dir, draft_config, tmp_path, edit, kwargs, message
):
    config = copy.deepcopy(draft_config)
    if edit is not None:
        edit(config)
    with pytest.raises(ValueError) as info:
        _resolve(sglang_cpu, smollm2_dir, _write(tmp_path, config), **kwargs)
    assert message in str(info.value)


def test_missing_draft_is_refused(sglang_cpu, smollm2_dir):
    with pytest.raises(ValueError, match="--speculative-draft-model-path"):
        _resolve(sglang_cpu, smollm2_dir, None)


def test_cpu_standin_ops(sglang_cpu):
    """The `sgl_kernel` CPU stand-in does what SGLang's call sites expect of each op."""
    import sgl_kernel

    assert sgl_kernel.__file__.startswith(str(cpu_compat.STANDIN_DIR))
    req_to_token = torch.zeros(3, 8, dtype=torch.int32)
    rows, start, end = torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([3, 2])
    sgl_kernel.assign_req_to_token_pool_cpu(
        rows, req_to_token, start, end, torch.tensor([5, 6, 7, 8]), 8
    )
    assert req_to_token[2, 1:3].tolist() == [5, 6] and req_to_token[0, :2].tolist() == [7, 8]
    packed = torch.empty(4, dtype=torch.int64)
    sgl_kernel.assign_extend_cache_locs_cpu(rows, req_to_token, start, end, packed, 8)
    assert packed.tolist() == [5, 6, 7, 8]
    out = torch.empty(4, dtype=torch.int64)
    sgl_kernel.assign_draft_cache_locs_contiguous_cpu(
        rows, req_to_token, torch.tensor([1, 0]), out, 8, 1, 2
    )
    assert out.tolist() == [5, 6, 7, 8]
    k, v = torch.arange(12.0).view(4, 3), torch.arange(8, dtype=torch.int16).view(4, 2)
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()])
    strides = torch.tensor([k.stride(0) * k.element_size(), v.stride(0) * v.element_size()])
    sgl_kernel.copy_all_layer_kv_cache_cpu(
        ptrs, strides, torch.tensor([0, 3]), torch.tensor([2, 1])
    )
    assert k[0].tolist() == [6.0, 7.0, 8.0] and k[3].tolist() == [3.0, 4.0, 5.0]
    assert v[0].tolist() == [4, 5] and v[3].tolist() == [2, 3]
    with pytest.raises(NotImplementedError, match="stand-in"):
        sgl_kernel.fused_moe_cpu()


def test_context_rope_table_refuses_layouts_the_op_does_not_rotate(sglang_cpu):
    from sglang.srt.layers.rotary_embedding import get_rope

    from dflare_sgl.sglang_plugin.models.layer_mix_params import context_rope_table

    rope = {"max_position": 128, "base": 10000}
    table = context_rope_table(get_rope(64, rotary_dim=64, **rope), 64)
    assert table.shape == (128, 64) and table.dtype == torch.float32
    with pytest.raises(ValueError, match="interleaved"):
        context_rope_table(get_rope(64, rotary_dim=64, is_neox_style=False, **rope), 64)
    with pytest.raises(ValueError, match="rotates 32 of 64 head dims"):
        context_rope_table(get_rope(64, rotary_dim=32, **rope), 64)


_RESOLVE_FROM_HUB_CACHE = """
import json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.server_args import ServerArgs

args = ServerArgs(model_path="dflare-test/target", device="cpu", speculative_algorithm="DFLARE",
                  speculative_draft_model_path="dflare-test/draft")
args.resolve_once()
print(json.dumps({"block": resolved_view(args).speculative_num_draft_tokens}))
"""


def test_hub_ids_resolve_as_sglang_resolves_its_models(smollm2_dir, draft_config, tmp_path):
    """`--model-path org/name` and a draft hub id work as for SGLang's own models: here both
    come from a local Hugging Face cache layout, offline (no hub in tests)."""
    hub = tmp_path / "hub"
    for repo, source in (("target", smollm2_dir), ("draft", None)):
        snapshot = hub / f"models--dflare-test--{repo}" / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
        if source is None:
            (snapshot / "config.json").write_text(json.dumps(draft_config))
        else:
            for f in source.iterdir():
                (snapshot / f.name).symlink_to(f)
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", SGLANG_USE_CPU_ENGINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(cpu_compat.STANDIN_DIR), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", _RESOLVE_FROM_HUB_CACHE], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"block": 8}


@pytest.mark.parametrize("backend", [None, "fa3"])
def test_gpu_server_args_resolve_as_dflash_does(sglang_cpu, smollm2_dir, tmp_path, backend):
    """On a CUDA device, DFLARE's resolved server arguments equal DFLASH's for the same
    inputs (a DFlash and a DFlare draft of one shape), the algorithm and draft path aside:
    the draft attention backend is resolved by SGLang's own DFLASH code."""
    from sglang.srt.arg_groups.overrides import field_names, resolved_view
    from sglang.srt.server_args import ServerArgs

    resolved = {}
    for algorithm, fusion in (("DFLASH", "shared"), ("DFLARE", "layerwise")):
        config = DraftConfig.for_target(
            AutoConfig.from_pretrained(smollm2_dir), num_draft_layers=2, block_size=8, fusion=fusion
        )
        DFlareDraftModel(config, generator=torch.Generator().manual_seed(0)).save_pretrained(
            tmp_path / fusion
        )
        extra = {} if backend is None else {"attention_backend": backend}
        args = ServerArgs(
            model_path=str(smollm2_dir), device="cuda", speculative_algorithm=algorithm,
            speculative_draft_model_path=str(tmp_path / fusion), mem_fraction_static=0.8,
            random_seed=0, **extra,
        )  # fmt: skip
        args.resolve_once()
        view = resolved_view(args)
        resolved[algorithm] = {f: repr(getattr(view, f, None)) for f in field_names(ServerArgs)}
    differing = {f for f in resolved["DFLASH"] if resolved["DFLASH"][f] != resolved["DFLARE"][f]}
    assert differing == {"speculative_algorithm", "speculative_draft_model_path"}
    assert resolved["DFLARE"]["speculative_draft_attention_backend"] != "None"


@pytest.mark.parametrize("causal", [True, False])
def test_verify_block_attention_matches_torch_native(sglang_cpu, causal):
    """cpu_compat's TARGET_VERIFY attention (each request's new rows against its keys) gives
    torch_native's own extend attention (queries padded to every position, last rows kept)
    on ragged prefixes, grouped-query heads, 1- and 4-row blocks; outside TARGET_VERIFY it
    hands the call to torch_native."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    reference = TorchNativeAttnBackend._run_sdpa_forward_extend
    reference = getattr(reference, "__wrapped__", reference)  # the method before any hook
    backend = object.__new__(TorchNativeAttnBackend)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, slots = 6, 2, 16, 64
    k_cache = torch.randn(slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(slots, kv_heads, dim, generator=g)
    req_to_token = torch.randperm(slots, generator=g)[:48].view(3, 16)
    for new in (1, 4):
        prefixes = torch.tensor([3, 9, 0])
        lens = torch.full((3,), new)
        query = torch.randn(3 * new, heads, dim, generator=g)
        args = (k_cache, v_cache, req_to_token, torch.tensor([2, 0, 1]), prefixes + new)
        args += (prefixes, lens, None)
        kwargs = dict(scaling=0.3, enable_gqa=True, causal=causal)
        expected = reference(backend, query, torch.empty_like(query), *args, **kwargs)
        calls = []

        def original(*a, **kw):
            calls.append(a)
            return reference(*a, **kw)

        token = cpu_compat._IN_TARGET_VERIFY.set(True)
        try:
            got = cpu_compat._block_attention(
                original, backend, query, torch.empty_like(query), *args, **kwargs
            )
        finally:
            cpu_compat._IN_TARGET_VERIFY.reset(token)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not calls
        out = torch.empty_like(query)
        cpu_compat._block_attention(original, backend, query, out, *args, **kwargs)
        assert len(calls) == 1  # not in TARGET_VERIFY: torch_native's own


@pytest.mark.skipif(not has_kernel("skinny_linear", "cpu"), reason="extension not built")
def test_cpu_linears_run_on_skinny_linear(sglang_cpu):
    """In CPU mode SGLang's unquantized linears and plain lm_head are the project's
    skinny_linear kernel for 1-8 rows (bit for bit) and F.linear past that."""
    from sglang.srt.layers.logits_processor import LogitsProcessor
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(320, 576, generator=g), requires_grad=False)
    bias = torch.randn(320, generator=g)
    processor = object.__new__(LogitsProcessor)  # the fields _compute_lm_head reads
    processor.use_fp32_lm_head, processor.rl_on_policy_target = False, None
    with torch.inference_mode():
        for rows in (1, 2, 5, 8, 9):
            x = torch.randn(rows, 576, generator=g)
            expected = torch.ops.dflare.skinny_linear(x, layer.weight, bias) if rows <= 8 else None
            got = UnquantizedLinearMethod().apply(layer, x, bias)
            logits = LogitsProcessor._compute_lm_head(processor, x, layer)
            reference = torch.nn.functional.linear(x, layer.weight, bias)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)
            if expected is None:
                assert torch.equal(got, reference)
                continue
            assert not torch.equal(expected, reference)  # else the test could not tell
            assert torch.equal(got, expected)
            assert torch.equal(logits, torch.ops.dflare.skinny_linear(x, layer.weight, None))
