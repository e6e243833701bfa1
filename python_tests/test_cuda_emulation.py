"""The CUDA kernels (``csrc/*_cuda.cu``) executed without a GPU, on the CPU emulation of the CUDA
execution model (``cuda_emulation/``, built by ``cuda_emulator.py``).

Every kernel path against the PyTorch reference (exact for verify_block; the stated tolerances
of ``test_layer_mix_kv`` for layer_mix_kv), under every launch configuration the host code can
choose, in shuffled block orders; the global-memory bytes each kernel reads, counted; and the
emulator's own checks (divergent barriers, bad warp masks, uninitialised shared memory).
The paths run and the bytes counted are listed at the end of the pytest run.
"""

from __future__ import annotations

import pytest
import torch
from cuda_emulator import REPORT, load
from test_layer_mix_kv import (
    FP8_TOL,
    FP32_TOL,
    HD,
    KVH,
    LOW_TOL,
    assert_caches_match,
    fused_projection_views,
    make_case,
    op_args,
    run_reference,
)
from test_verify_block import _random_case, infinite_max_cases

from dflare_sgl._ext import has_kernel
from dflare_sgl.verify import VerifyOutput, verify_block_reference

# (multiprocessors, CTAs per SM) the host code sees: it splits each logits row over enough
# CTAs to fill one wave, so these give one split (a tiny device), a few, and the most allowed.
CONFIGS = {"1sm": (1, 1), "h100": (132, 8), "huge": (4096, 32)}


@pytest.fixture(scope="module")
def emu():
    return load()


def _emulated_verify(emu, args, config: str, order_seed: int = 0) -> tuple[VerifyOutput, dict]:
    emu.configure(*CONFIGS[config], order_seed)
    out = VerifyOutput(*emu.verify_block(*args))
    (launch,) = emu.launches()
    return out, launch


def _splits(launch: dict, rows: int) -> int:
    assert launch["grid"] % rows == 0
    return launch["grid"] // rows


VERIFY_CASES = [  # (bs, B, V, dtype): mixed greedy / temperature / top-k / top-p requests
    (1, 16, 1000, torch.float32),
    (6, 2, 1000, torch.bfloat16),
    (9, 8, 1000, torch.float16),
    (4, 16, 1003, torch.float32),  # rows not 16-byte aligned: head and tail elements
    (12, 8, 997, torch.bfloat16),
    (64, 2, 1000, torch.bfloat16),
    (3, 16, 49152, torch.bfloat16),
    (1, 2, 151936, torch.bfloat16),
    (1, 8, 151936, torch.float16),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bs,block,vocab,dtype", VERIFY_CASES)
def test_verify_block_kernel_matches_reference(emu, bs, block, vocab, dtype, config):
    args = _random_case(bs, block, vocab, dtype, seed=100 * bs + block)
    want = verify_block_reference(*args)
    got, launch = _emulated_verify(emu, args, config, order_seed=bs)
    for name, w, g in zip(VerifyOutput._fields, want, got, strict=True):
        assert torch.equal(w, g), (name, w, g)
    splits = _splits(launch, bs * block)
    REPORT.append(f"verify_block bs={bs} B={block} V={vocab} {dtype} {config}: splits={splits}, ok")


def test_verify_block_kernel_without_stop_ids(emu):
    args = list(_random_case(16, 4, 1000, torch.float32, seed=5))
    args[8] = torch.empty(16, 0, dtype=torch.int64)
    want = verify_block_reference(*args)
    got, _ = _emulated_verify(emu, args, "h100")
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


def _one_mode_case(mode: str, shape: str, bs: int, block: int, vocab: int):
    """A random bf16 case whose requests all sample one way (temperature 0.8, Qwen3's top-k 20
    and top-p 0.95), on rows shaped like a language model's (`peaked`: a few likely tokens
    over a low bulk) or flat (`_random_case`'s rows: no token dominates the bulk)."""
    args = list(_random_case(bs, block, vocab, torch.bfloat16, seed=7))
    if shape == "peaked":
        g = torch.Generator().manual_seed(8)
        logits = torch.randn(bs * block, vocab, generator=g) * 1.5
        hot = torch.randint(vocab, (bs * block, 4), generator=g)
        logits.scatter_(1, hot, torch.tensor([18.0, 16.0, 15.0, 14.0]).expand(bs * block, 4))
        args[1] = logits.to(torch.bfloat16)
    args[4] = torch.full((bs,), 0.0 if mode == "greedy" else 0.8)  # temperatures
    args[5] = torch.full((bs,), 20 if "top_k" in mode else 0)  # top_k
    args[6] = torch.full((bs,), 0.95 if "top_p" in mode else 1.0)  # top_p
    return args


# How often each mode reads a logits row: once, the bandwidth floor, on LM-shaped rows. On
# flat rows top-p alone keeps thousands of tokens, more than the candidates hold: the row's
# last CTA then reads the row again for its radix passes (a max pass, 4 selection passes and
# a Gumbel pass: 7x in all). With top-k the candidates always decide.
LOGITS_READS = {
    ("greedy", "peaked"): 1,
    ("sampled", "peaked"): 1,
    ("top_k", "peaked"): 1,
    ("top_p", "peaked"): 1,
    ("top_k+top_p", "peaked"): 1,
    ("top_k", "flat"): 1,
    ("top_p", "flat"): 7,
    ("top_k+top_p", "flat"): 1,
}


@pytest.mark.parametrize("mode,shape", LOGITS_READS)
def test_verify_block_kernel_reads_logits(emu, mode, shape):
    bs, block, vocab = 2, 8, 151936
    args = _one_mode_case(mode, shape, bs, block, vocab)
    got, launch = _emulated_verify(emu, args, "h100")
    want = verify_block_reference(*args)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
    logits = args[1]
    read, written = launch["bytes"]["logits"]
    assert written == 0
    assert read == LOGITS_READS[mode, shape] * logits.numel() * logits.element_size()
    REPORT.append(
        f"verify_block {mode} {shape} rows bs={bs} B={block} V={vocab} bf16: logits read "
        f"{read / (logits.numel() * logits.element_size()):.2f}x ({read} bytes), "
        f"{_splits(launch, bs * block)} splits"
    )


@pytest.mark.parametrize("config", ["1sm", "h100"])
def test_verify_block_kernel_on_language_model_rows(emu, smollm2_target, config):
    """SmolLM2's own next-token logits over a prompt, sampled with top-p 0.95 (no top-k, the
    hardest case for the candidates) at three temperatures: exact, and the logits read about
    once (a row whose kept set outgrows the candidates is read again; reported)."""
    model, tokenizer = smollm2_target
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :16]
    with torch.no_grad():
        logits = model(ids).logits[0].to(torch.bfloat16)
    block = 4
    bs = logits.shape[0] // block
    for temperature in (0.6, 0.8, 1.0):
        args = list(_random_case(bs, block, logits.shape[1], torch.bfloat16, seed=11))
        args[1] = logits[: bs * block].contiguous()
        args[4] = torch.full((bs,), temperature)
        args[5] = torch.zeros(bs, dtype=torch.int64)
        args[6] = torch.full((bs,), 0.95)
        got, launch = _emulated_verify(emu, args, config)
        for w, g in zip(verify_block_reference(*args), got, strict=True):
            assert torch.equal(w, g)
        ratio = launch["bytes"]["logits"][0] / (args[1].numel() * args[1].element_size())
        assert ratio <= 7
        REPORT.append(
            f"verify_block top_p=0.95 T={temperature} on SmolLM2 rows ({bs * block} rows, "
            f"{config}, {_splits(launch, bs * block)} splits): logits read {ratio:.2f}x"
        )


@pytest.mark.parametrize("config", ["1sm", "h100"])
def test_verify_block_kernel_beyond_its_candidates(emu, config):
    """Rows the candidates cannot decide take the radix passes over the whole row, exactly:
    a top-k larger than the candidates held, and a tie group at the top larger than a CTA may
    keep (its cut must then drop the whole group)."""
    bs, block, vocab = 4, 2, 49152
    args = list(_random_case(bs, block, vocab, torch.float32, seed=13))
    logits = args[1]
    logits[::2, 1000:1700] = logits.max() + 1  # 700 tied top tokens in every other row
    args[4] = torch.full((bs,), 1.0)
    args[5] = torch.tensor([0, 5000, 30, 5000])  # top-k
    args[6] = torch.tensor([0.9, 1.0, 1.0, 0.9])  # top-p
    got, launch = _emulated_verify(emu, args, config)
    for w, g in zip(verify_block_reference(*args), got, strict=True):
        assert torch.equal(w, g)
    read = launch["bytes"]["logits"][0] / (logits.numel() * logits.element_size())
    assert read > 1  # the fallback ran
    REPORT.append(f"verify_block beyond the candidates ({config}): exact, logits read {read:.2f}x")


def test_verify_block_kernel_at_an_infinite_row_max(emu):
    for args in infinite_max_cases():
        got, _ = _emulated_verify(emu, args, "h100")
        for w, g in zip(verify_block_reference(*args), got, strict=True):
            assert torch.equal(w, g)


def test_verify_block_kernel_ignores_block_order(emu):
    args = _random_case(8, 4, 4096, torch.bfloat16, seed=3)
    outputs = [_emulated_verify(emu, args, "huge", order_seed=s)[0] for s in range(3)]
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other, strict=True):
            assert torch.equal(a, b)


def _emulated_layer_mix(emu, c, config: str = "h100", order_seed: int = 0):
    emu.configure(*CONFIGS[config], order_seed)
    k, v = [x.clone() for x in c.k_caches], [x.clone() for x in c.v_caches]
    emu.layer_mix_kv(*op_args(c, k, v))
    return (k, v), emu.launches()


TOLERANCES = {torch.float32: FP32_TOL, torch.bfloat16: LOW_TOL, torch.float16: LOW_TOL}


@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
@pytest.mark.parametrize(
    "dtype,cache_dtype,h",
    [
        (torch.float32, torch.float32, 64),  # vectorised loads (H % 4 == 0)
        (torch.float32, torch.float32, 62),  # scalar path
        (torch.bfloat16, torch.bfloat16, 64),
        (torch.bfloat16, torch.bfloat16, 60),  # scalar path (H % 8 != 0)
        (torch.float16, torch.float16, 64),
        (torch.bfloat16, torch.float8_e4m3fn, 64),
    ],
)
def test_layer_mix_kv_kernel_matches_reference(emu, fusion, dtype, cache_dtype, h):
    c = make_case(37, t=5, d=3, fusion=fusion, bias=True, dtype=dtype, cache_dtype=cache_dtype, h=h)
    got, launches = _emulated_layer_mix(emu, c)
    tol = FP8_TOL if cache_dtype.itemsize == 1 else TOLERANCES[dtype]
    assert_caches_match(c, got, run_reference(c), tol)
    REPORT.append(
        f"layer_mix_kv {fusion} {dtype} cache {cache_dtype} H={h}: "
        + ", ".join(f"{x['kernel']} grid={x['grid']}x{x['block']}" for x in launches)
        + ", ok"
    )


def test_layer_mix_kv_kernel_bf16_wide_hidden_is_exact(emu):
    c = make_case(40, t=9, d=7, dtype=torch.bfloat16, h=2048)
    got, _ = _emulated_layer_mix(emu, c)
    assert_caches_match(c, got, run_reference(c), dict(atol=0, rtol=0))


def test_layer_mix_kv_kernel_many_layers_and_tokens(emu):
    """D = 11 > 8 layers per pass over hidden (two passes), T = 9, N = 300 CTAs."""
    c = make_case(300, t=9, d=11, fusion="dflare", dtype=torch.bfloat16, seed=4)
    got, _ = _emulated_layer_mix(emu, c, order_seed=9)
    assert_caches_match(c, got, run_reference(c), LOW_TOL)


@pytest.mark.parametrize("fusion", ["dflare", "dfly"])
def test_layer_mix_kv_kernel_tiles_long_prefills(emu, fusion):
    """N = 2100 > 2048 tokens per tile: two passes, each token's hidden read once, and the
    caches as the reference writes them."""
    n = 2100
    c = make_case(n, t=3, d=2, fusion=fusion, seed=6)
    got, launches = _emulated_layer_mix(emu, c, order_seed=1)
    assert_caches_match(c, got, run_reference(c), FP32_TOL)
    mix = [x for x in launches if x["kernel"] == "mix_norm"]
    assert [x["grid"] for x in mix] == [2048, n - 2048]
    hidden_bytes = c.hidden.numel() * c.hidden.element_size()
    assert sum(x["bytes"]["hidden"][0] for x in mix) == hidden_bytes
    REPORT.append(f"layer_mix_kv {fusion} N={n}: mix_norm grids {[x['grid'] for x in mix]}")


@pytest.mark.parametrize("layout", ["stacked", "qkv", "apart"])
def test_layer_mix_kv_kernel_projection_views(emu, layout):
    c = make_case(21, t=5, d=3, fusion="dfly", bias=True, seed=3)
    want = run_reference(c)
    fused_projection_views(c, layout)
    got, _ = _emulated_layer_mix(emu, c)
    assert_caches_match(c, got, want, FP32_TOL)


def test_layer_mix_kv_kernel_padding_slot(emu):
    """CUDA-graph padding: padded tokens repeat one token and all write slot 0; the other slots
    are written exactly as without padding."""
    c = make_case(12, t=5, d=3, dtype=torch.float32, seed=2)
    pad = torch.arange(8, 12)
    c.hidden[pad] = c.hidden[8].clone()
    c.positions[pad] = c.positions[8].clone()
    c.slots[pad] = 0
    c.slots[:8] = torch.randperm(c.k_caches[0].shape[0] - 1)[:8] + 1
    got, _ = _emulated_layer_mix(emu, c)
    assert_caches_match(c, got, run_reference(c), FP32_TOL)


@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
def test_layer_mix_kv_kernel_bytes(emu, fusion):
    """The mixing kernel reads [N, T, H] exactly once; the store writes N rows per cache."""
    n, d = 40, 3
    c = make_case(n, t=5, d=d, fusion=fusion, dtype=torch.bfloat16, seed=1)
    _, launches = _emulated_layer_mix(emu, c)
    mix, store = launches
    hidden_bytes = c.hidden.numel() * c.hidden.element_size()
    row_bytes = KVH * HD * c.k_caches[0].element_size()
    if fusion == "dflash":  # the fc GEMM (cuBLAS) reads hidden; the kernel only normalises
        assert mix["bytes"]["hidden"] == (0, 0)
    else:
        assert mix["bytes"]["hidden"] == (hidden_bytes, 0)
    for i in range(d):
        assert store["bytes"][f"k_cache.{i}"] == (0, n * row_bytes)
        assert store["bytes"][f"v_cache.{i}"] == (0, n * row_bytes)
    REPORT.append(
        f"layer_mix_kv {fusion} N={n} bf16: hidden read {mix['bytes']['hidden'][0]} of "
        f"{hidden_bytes} bytes; each cache written {n * row_bytes} bytes"
    )


# ---- The emulator's own checks ----


@pytest.mark.parametrize(
    "kernel,message",
    [
        ("divergent_barrier", "divergent __syncthreads"),
        ("mask_omits_lane", "the mask omits the calling lane"),
        ("mask_names_exited_lane", "deadlock"),
        ("shuffle_outside_mask", "outside the mask"),
        ("uninitialised_shared", "reads shared memory this block has not written"),
        ("device_assert", "device assert: thread index too large"),
    ],
)
def test_emulator_reports_defects(emu, kernel, message):
    emu.configure(1, 1, 0)
    with pytest.raises(RuntimeError, match=message):
        emu.run_test_kernel(kernel, torch.zeros(128, dtype=torch.int32), 2, 64)


def test_emulator_shuffles_block_order(emu):
    last = set()
    for seed in range(4):
        emu.configure(1, 1, seed)
        out = torch.zeros(1, dtype=torch.int32)
        emu.run_test_kernel("last_block_wins", out, 16, 32)
        last.add(int(out))
    assert len(last) > 1


def test_emulator_collectives(emu):
    threads = 64
    out = torch.zeros(2 * threads, dtype=torch.int32)
    emu.configure(1, 1, 0)
    emu.run_test_kernel("collectives", out, 1, threads)
    t = torch.arange(threads)
    assert out[:threads].tolist() == [int(t[w * 32 : w * 32 + 32].sum()) for w in t // 32]
    for i in range(0, threads, 2):
        warp = range(i // 32 * 32, i // 32 * 32 + 32, 2)  # the active (even) lanes
        want = sum(1 << (j % 32) for j in warp if j % 3 == i % 3)
        assert int(out[threads + i]) & 0xFFFFFFFF == want


# ---- On a lent GPU (scripts/gpu_session.sh ops): the emulated kernels beside the real ones ----

DEVICE_KERNELS = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("verify_block", "cuda")),
    reason="needs a GPU and dflare_sgl._C built with CUDA",
)


@DEVICE_KERNELS
@pytest.mark.parametrize("bs,block,vocab,dtype", VERIFY_CASES)
def test_device_verify_block_matches_emulation(emu, bs, block, vocab, dtype):
    args = _random_case(bs, block, vocab, dtype, seed=100 * bs + block)
    emulated, _ = _emulated_verify(emu, args, "h100")
    device = torch.ops.dflare.verify_block(*(a.cuda() for a in args))
    for name, e, d in zip(VerifyOutput._fields, emulated, device, strict=True):
        assert torch.equal(e, d.cpu()), name


@DEVICE_KERNELS
@pytest.mark.parametrize("mode,shape", LOGITS_READS)
def test_device_verify_block_filtered_rows_match_emulation(emu, mode, shape):
    args = _one_mode_case(mode, shape, 2, 8, 151936)
    emulated, _ = _emulated_verify(emu, args, "h100")
    device = torch.ops.dflare.verify_block(*(a.cuda() for a in args))
    for name, e, d in zip(VerifyOutput._fields, emulated, device, strict=True):
        assert torch.equal(e, d.cpu()), name


@DEVICE_KERNELS
@pytest.mark.parametrize("fusion", ["dflare", "dflash", "dfly"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_layer_mix_kv_matches_emulation(emu, fusion, dtype):
    c = make_case(300, t=9, d=7, fusion=fusion, bias=True, dtype=dtype, seed=8)
    (k, v), _ = _emulated_layer_mix(emu, c)
    g = make_case(300, t=9, d=7, fusion=fusion, bias=True, dtype=dtype, seed=8, device="cuda")
    k_dev, v_dev = [x.clone() for x in g.k_caches], [x.clone() for x in g.v_caches]
    torch.ops.dflare.layer_mix_kv(*op_args(g, k_dev, v_dev))
    # The device's rsqrtf is approximate (the emulation's is exact): the layer_mix tolerances.
    for emulated, device in zip(k + v, k_dev + v_dev, strict=True):
        torch.testing.assert_close(device.cpu().float(), emulated.float(), **TOLERANCES[dtype])
