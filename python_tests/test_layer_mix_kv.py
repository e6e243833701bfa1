"""layer_mix_kv: the C++ / CUDA kernels against layer_mix_kv_reference, and the wrapper's checks.

Kernel tests call ``torch.ops.dflare.layer_mix_kv`` directly and skip when the extension (or a
GPU) is missing. Every case starts the caches from random contents, writes N tokens at a
shuffled subset of the slots and compares every slot, so writes to the wrong slot or to
untouched slots fail too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dflare_sgl._ext import has_kernel
from dflare_sgl.layer_mix import LayerMixWeights, layer_mix_kv, layer_mix_kv_reference
from dflare_sgl.primitives import build_cos_sin_cache

H, KVH, HD, MAX_POS = 64, 2, 16, 256
# float32: both sides compute the same float32 ops in a different summation order.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16/fp16: every elementwise rounding matches the reference, but a GEMM summed in another
# order may land one ulp away (rare: ~0.3% of elements here); after k_norm the values are
# O(1), and RoPE's difference of products can leave that ulp of a value below 8 (2^-5) on a
# small result, hence an absolute term, plus two bf16 ulps relative.
LOW_TOL = dict(atol=2**-5, rtol=2**-7)
# float8 caches: one e4m3 ulp (2^-3 relative) where an input sits on a rounding boundary.
FP8_TOL = dict(atol=2**-9, rtol=2**-3)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def make_weights(
    t: int,
    d: int,
    fusion: str,
    bias: bool,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    h: int = H,
) -> LayerMixWeights:
    def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen) * scale + offset
        return x.to(device=device, dtype=dtype)

    o = KVH * HD
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    return LayerMixWeights(
        fusion_probs=(
            torch.softmax(torch.randn(d, t, generator=gen), -1).to(device)
            if fusion in ("dflare", "dfly")
            else None
        ),
        fc_weight=(
            rand(h, t * h, scale=(t * h) ** -0.5) if fusion in ("dflash", "dfly") else None
        ),
        hidden_norm_weight=rand(h, scale=0.1, offset=1.0),
        k_proj_weight=rand(d, o, h, scale=h**-0.5),
        v_proj_weight=rand(d, o, h, scale=h**-0.5),
        k_proj_bias=rand(d, o, scale=0.1) if bias else None,
        v_proj_bias=rand(d, o, scale=0.1) if bias else None,
        k_norm_weight=rand(d, HD, scale=0.1, offset=1.0),
        eps=1e-6,
        cos_sin_cache=build_cos_sin_cache(inv_freq, MAX_POS).to(device),
    )


@dataclasses.dataclass
class Case:
    hidden: torch.Tensor
    w: LayerMixWeights
    positions: torch.Tensor
    slots: torch.Tensor
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]


def make_case(
    n: int,
    t: int = 9,
    d: int = 7,
    fusion: str = "dflare",
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    device: str = "cpu",
    seed: int = 0,
    h: int = H,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    num_slots = n + 11  # some slots are never written
    hidden = (torch.randn(n, t, h, generator=gen) * 2).to(device=device, dtype=dtype)

    def caches() -> list[torch.Tensor]:
        return [
            torch.randn(num_slots, KVH, HD, generator=gen).to(device, cache_dtype or dtype)
            for _ in range(d)
        ]

    return Case(
        hidden=hidden,
        w=make_weights(t, d, fusion, bias, dtype, device, gen, h),
        positions=torch.randint(0, MAX_POS, (n,), generator=gen).to(device),
        slots=torch.randperm(num_slots, generator=gen)[:n].to(device),  # shuffled, with gaps
        k_caches=caches(),
        v_caches=caches(),
    )


def op_args(c: Case, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> tuple:
    """The op's arguments in schema order, writing into ``k_caches`` / ``v_caches``."""
    w = c.w
    return (
        c.hidden, w.fusion_probs, w.fc_weight, w.hidden_norm_weight, w.k_proj_weight,
        w.v_proj_weight, w.k_proj_bias, w.v_proj_bias, w.k_norm_weight, w.eps, c.positions,
        w.cos_sin_cache, c.slots, k_caches, v_caches,
    )  # fmt: skip


def run_op(c: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torch.ops.dflare.layer_mix_kv on copies of the caches."""
    k, v = [x.clone() for x in c.k_caches], [x.clone() for x in c.v_caches]
    torch.ops.dflare.layer_mix_kv(*op_args(c, k, v))
    return k, v


def run_reference(c: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    k, v = [x.clone() for x in c.k_caches], [x.clone() for x in c.v_caches]
    layer_mix_kv_reference(c.hidden, c.w, c.positions, c.slots, k, v)
    return k, v


def assert_caches_match(c: Case, got, want, tol: dict) -> None:
    untouched = torch.ones(c.k_caches[0].shape[0], dtype=torch.bool, device=c.slots.device)
    untouched[c.slots] = False
    for got_list, want_list, before in zip(got, want, (c.k_caches, c.v_caches), strict=True):
        for g, r, b in zip(got_list, want_list, before, strict=True):
            torch.testing.assert_close(g.float(), r.float(), **tol)
            assert torch.equal(g[untouched].float(), b[untouched].float())


def require_kernel(device: str) -> None:
    if not has_kernel("layer_mix_kv", device):
        pytest.skip(f"dflare_sgl._C has no {device} kernel for layer_mix_kv (extension not built)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
@pytest.mark.parametrize("d", [1, 5, 7])
@pytest.mark.parametrize("t", [1, 5, 9])
def test_kernel_float32_matches_reference(device, t, d, fusion, bias):
    require_kernel(device)
    c = make_case(37, t=t, d=d, fusion=fusion, bias=bias, device=device, seed=t * 10 + d)
    assert_caches_match(c, run_op(c), run_reference(c), FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
@pytest.mark.parametrize(
    "dtype, cache_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_kernel_low_precision_matches_reference(device, dtype, cache_dtype, fusion, bias):
    require_kernel(device)
    c = make_case(29, fusion=fusion, bias=bias, dtype=dtype, cache_dtype=cache_dtype, device=device)
    assert_caches_match(c, run_op(c), run_reference(c), LOW_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_bf16_wide_hidden_is_exact(device):
    """At Qwen-like widths (H = 2048) the RMS of the mixed context is summed accurately enough
    that every bf16 output equals the reference's (a sequential float32 sum did not: ~500
    elements off by up to 0.023)."""
    require_kernel(device)
    c = make_case(40, t=9, d=7, dtype=torch.bfloat16, device=device, h=2048)
    assert_caches_match(c, run_op(c), run_reference(c), dict(atol=0, rtol=0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_kernel_float8_cache(device, cache_dtype):
    require_kernel(device)
    c = make_case(23, cache_dtype=cache_dtype, device=device)
    assert_caches_match(c, run_op(c), run_reference(c), FP8_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 2, 600])  # 600 spans several token blocks per thread
@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
def test_kernel_token_counts(device, n, fusion):
    require_kernel(device)
    c = make_case(n, t=5, d=3, fusion=fusion, bias=True, device=device, seed=n)
    assert_caches_match(c, run_op(c), run_reference(c), FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_strided_cache_slots(device):
    """K and V of a layer interleaved in one buffer: the slot stride is twice the row size."""
    require_kernel(device)
    c = make_case(19, t=5, d=3, dtype=torch.bfloat16, device=device)
    buffers = [torch.stack([k, v], dim=1) for k, v in zip(c.k_caches, c.v_caches, strict=True)]
    c.k_caches, c.v_caches = [b[:, 0] for b in buffers], [b[:, 1] for b in buffers]
    assert c.k_caches[0].stride(0) == 2 * KVH * HD
    assert_caches_match(c, run_op(c), run_reference(c), LOW_TOL)


def fused_projection_views(c: Case, layout: str) -> None:
    """Rebind c's K/V projections as views into one buffer, as the SGLang drafts store them:
    "stacked" [D, 2, O, H] (DFlare: V rows right after K rows, one GEMM for both), "qkv" the K
    and V rows of fused per-layer [q + 2O, H] weights (DFly; strided across layers), "apart"
    K and V not adjacent (two projections)."""
    w = c.w
    d, o, h = w.k_proj_weight.shape
    q = 3 * o  # room for query rows before K and V
    rows = {"stacked": (0, o, 2 * o), "qkv": (q, q + o, q + 2 * o), "apart": (0, 2 * o, 3 * o)}
    k_at, v_at, width = rows[layout]
    weight = torch.zeros(d, width + (q if layout == "qkv" else 0), h, dtype=w.k_proj_weight.dtype)
    weight[:, k_at : k_at + o] = w.k_proj_weight
    weight[:, v_at : v_at + o] = w.v_proj_weight
    w.k_proj_weight, w.v_proj_weight = weight[:, k_at : k_at + o], weight[:, v_at : v_at + o]
    if w.k_proj_bias is not None:
        bias = torch.zeros(d, weight.shape[1], dtype=w.k_proj_bias.dtype)
        bias[:, k_at : k_at + o], bias[:, v_at : v_at + o] = w.k_proj_bias, w.v_proj_bias
        w.k_proj_bias, w.v_proj_bias = bias[:, k_at : k_at + o], bias[:, v_at : v_at + o]


@pytest.mark.parametrize("layout", ["stacked", "qkv", "apart"])
@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
def test_kernel_projection_views(layout, fusion):
    require_kernel("cpu")
    c = make_case(21, t=5, d=3, fusion=fusion, bias=True, seed=3)
    want = run_reference(c)
    fused_projection_views(c, layout)
    assert not c.w.k_proj_weight.is_contiguous() or layout == "stacked"
    assert_caches_match(c, run_op(c), want, FP32_TOL)
    assert_caches_match(c, run_reference(c), want, FP32_TOL)


def test_cpu_kernel_rejects_out_of_range_slot():
    require_kernel("cpu")
    c = make_case(5, t=2, d=2)
    c.slots[3] = c.k_caches[0].shape[0]
    with pytest.raises(RuntimeError, match="slot"):
        run_op(c)


@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
def test_op_has_a_fake_kernel(fusion):
    """opcheck: schema (the caches are mutated in place), fake kernel, autograd registration."""
    require_kernel("cpu")
    c = make_case(9, t=3, d=2, fusion=fusion, bias=True)
    args = op_args(c, c.k_caches, c.v_caches)
    torch.library.opcheck(torch.ops.dflare.layer_mix_kv.default, args)


@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
def test_wrapper_matches_reference(fusion):
    c = make_case(17, t=5, d=3, fusion=fusion, bias=True)
    k, v = [x.clone() for x in c.k_caches], [x.clone() for x in c.v_caches]
    layer_mix_kv(c.hidden, c.w, c.positions, c.slots, k, v)
    assert_caches_match(c, (k, v), run_reference(c), FP32_TOL)


def _no_fusion(c: Case) -> None:
    c.w.fusion_probs = None


def _hidden_2d(c: Case) -> None:
    c.hidden = c.hidden[:, 0]


def _weight_dtype(c: Case) -> None:
    c.w.k_proj_weight = c.w.k_proj_weight.half()


def _probs_shape(c: Case) -> None:
    c.w.fusion_probs = c.w.fusion_probs[:, :1].contiguous()


def _bias_shape(c: Case) -> None:
    c.w.k_proj_bias = torch.zeros(2, KVH * HD)
    c.w.v_proj_bias = torch.zeros(2, KVH * HD + 1)


def _one_bias(c: Case) -> None:
    c.w.k_proj_bias = torch.zeros(2, KVH * HD)


def _weight_not_dense_per_layer(c: Case) -> None:
    c.w.v_proj_weight = c.w.v_proj_weight.transpose(1, 2).contiguous().transpose(1, 2)


def _too_few_caches(c: Case) -> None:
    c.v_caches = c.v_caches[:1]


def _cache_shape(c: Case) -> None:
    c.k_caches[1] = c.k_caches[1][:, :1]


def _mixed_cache_dtypes(c: Case) -> None:
    c.v_caches[0] = c.v_caches[0].half()


def _int32_slots(c: Case) -> None:
    c.slots = c.slots.int()


def _slot_out_of_range(c: Case) -> None:
    c.slots[0] = c.k_caches[0].shape[0]


def _negative_slot(c: Case) -> None:
    c.slots[2] = -1


def _position_out_of_range(c: Case) -> None:
    c.positions[1] = MAX_POS


def _noncontiguous_hidden(c: Case) -> None:
    c.hidden = c.hidden.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_no_fusion, "set fusion_probs"),
        (_hidden_2d, r"hidden must be \[N, T, H\]"),
        (_weight_dtype, "k_proj_weight must be torch.float32"),
        (_probs_shape, r"fusion_probs must have shape \(2, 3\)"),
        (_bias_shape, r"v_proj_bias must have shape \(2, 32\)"),
        (_one_bias, "pass both projection biases or neither"),
        (_weight_not_dense_per_layer, "v_proj_weight must be dense within each layer"),
        (_too_few_caches, r"v_caches has 1 tensors, expected one per layer \(2\)"),
        (_cache_shape, r"k_caches tensors must all be \[num_slots, 2, 16\]"),
        (_mixed_cache_dtypes, "caches must share one dtype"),
        (_int32_slots, "slots must be torch.int64"),
        (_slot_out_of_range, r"slots must lie in \[0, 15\)"),
        (_negative_slot, r"slots must lie in \[0, 15\)"),
        (_position_out_of_range, "positions must lie in"),
        (_noncontiguous_hidden, "hidden must be contiguous"),
    ],
)
def test_wrapper_errors(corrupt, message):
    c = make_case(4, t=3, d=2)
    corrupt(c)
    with pytest.raises(ValueError, match=message):
        layer_mix_kv(c.hidden, c.w, c.positions, c.slots, c.k_caches, c.v_caches)
