"""verify_block: the reference's exact rules, and the C++ / CUDA kernels against it.

Kernel tests compare every output for exact equality with ``verify_block_reference`` on
random batches mixing greedy, temperature, top-k and top-p requests; they skip when the
extension (``dflare_sgl._C``) is not built, and the CUDA ones without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from scipy.stats import chisquare

from dflare_sgl import _ext
from dflare_sgl.verify import (
    VerifyOutput,
    _filter_keep,
    philox4x32_10,
    philox_uniform,
    sample_rows,
    verify_block,
    verify_block_reference,
)

CUDA_KERNEL = torch.cuda.is_available() and _ext.has_kernel("verify_block", "cuda")
IMPLS = [
    pytest.param("reference", id="reference"),
    pytest.param(
        "cpu",
        id="cpu",
        marks=pytest.mark.skipif(
            not _ext.has_kernel("verify_block", "cpu"),
            reason="dflare_sgl._C not built (pip install --no-build-isolation -e .)",
        ),
    ),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            not CUDA_KERNEL, reason="needs a GPU and dflare_sgl._C built with CUDA"
        ),
    ),
]
KERNELS = IMPLS[1:]


def _run(impl: str, *args: torch.Tensor) -> VerifyOutput:
    """verify_block by one implementation; outputs come back on the CPU."""
    if impl == "reference":
        return verify_block_reference(*args)
    out = torch.ops.dflare.verify_block(*(a.to(impl) for a in args))
    return VerifyOutput(*(o.cpu() for o in out))


def _i64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64)


def _f32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# Random123 known-answer vectors for Philox4x32-10 (counter words, key words, output words).
@pytest.mark.parametrize(
    "counter,key,expected",
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32_10(_i64(counter), _i64(key)).tolist() == expected


def test_philox_uniform_layout():
    """u[v] comes from word v & 3 of the block v >> 2, keyed by the seed's two halves and
    counted by the position's two halves; negative seeds use their two's-complement bits."""
    seed, pos, vocab = -3, 2**33 + 5, 11
    u = philox_uniform(_i64([seed]), _i64([pos]), vocab)[0]
    key = _i64([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF])
    for v in range(vocab):
        word = philox4x32_10(_i64([v >> 2, pos & 0xFFFFFFFF, pos >> 32, 0]), key)[v & 3]
        assert u[v].item() == ((word.item() >> 9) + 0.5) * 2.0**-23
    assert 0.0 < u.min() and u.max() < 1.0


def _greedy_logits(targets: list[list[int]], vocab: int) -> torch.Tensor:
    logits = torch.zeros(sum(map(len, targets)), vocab)
    logits[torch.arange(logits.shape[0]), _i64(sum(targets, []))] = 5.0
    return logits


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_accept_stop_budget(impl):
    """Hand-checked accept / stop / budget cuts for four greedy requests, B = 4."""
    targets = [[1, 2, 3, 4], [5, 5, 5, 5], [0, 1, 2, 3], [7, 7, 7, 7]]
    drafts = _i64([[1, 2, 6], [5, 6, 5], [0, 1, 2], [7, 7, 7]])
    seq_lens = _i64([10, 20, 30, 40])
    slots = torch.arange(16, dtype=torch.int64).view(4, 4) + 100
    out = _run(
        impl,
        drafts,
        _greedy_logits(targets, 8),
        seq_lens,
        _i64([9, 9, 2, -1]),
        torch.zeros(4),  # all greedy
        _i64([0] * 4),
        torch.ones(4),
        _i64([0, 1, 2, 3]),
        _i64([[-1, 9], [5, -1], [6, -1], [-1, -1]]),
        slots,
    )
    assert out.accept_lens.tolist() == [2, 1, 3, 3]
    # req 1 stops on its first token (5); req 2 has budget 2; req 3 has none.
    assert out.num_committed.tolist() == [3, 1, 2, 0]
    assert out.committed.tolist() == [[1, 2, 3, -1], [5, -1, -1, -1], [0, 1, -1, -1], [-1] * 4]
    assert out.new_seq_lens.tolist() == [13, 21, 32, 40]
    assert out.free_slots.tolist() == [
        [-1, -1, -1, 103],
        [-1, 105, 106, 107],
        [-1, -1, 110, 111],
        [112, 113, 114, 115],
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_ties_take_lowest_index(impl, dtype):
    logits = torch.full((3, 4000), -1.0)
    logits[0, [7, 3000, 9]] = 2.0
    logits[1] = 0.0  # all tied: token 0
    logits[2, [3999, 2500]] = -0.0  # -0.0 == +0.0 ties with the +0.0 at 1200
    logits[2, 1200] = 0.0
    out = _run(
        impl,
        torch.zeros(1, 2, dtype=torch.int64),
        logits.to(dtype),
        _i64([0]),
        _i64([3]),
        _f32([0.0]),
        _i64([0]),
        _f32([1.0]),
        _i64([0]),
        torch.empty(1, 0, dtype=torch.int64),
        _i64([[0, 1, 2]]),
    )
    assert out.committed.tolist() == [[7, -1, -1]]  # d_1 = 0 != 7: nothing accepted
    rows = sample_rows(
        logits.to(dtype),
        _i64([0, 1, 2]),
        torch.zeros(3),
        _i64([0] * 3),
        torch.ones(3),
        _i64([0] * 3),
    )
    assert rows.tolist() == [7, 0, 1200]


def _sample_once_each(
    impl: str, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, n: int
) -> torch.Tensor:
    """One sampled token per request for n requests (seed i, position 1000 + i) over the same
    logits row, through verify_block with B = 1 (the committed token is the bonus)."""
    vocab = logits.shape[-1]
    rep = torch.ones(n)
    out = _run(
        impl,
        torch.empty(n, 0, dtype=torch.int64),
        logits.expand(n, vocab).contiguous(),
        1000 + torch.arange(n),
        torch.ones(n, dtype=torch.int64),
        temperature * rep,
        torch.full((n,), top_k),
        top_p * rep,
        torch.arange(n),
        torch.empty(n, 0, dtype=torch.int64),
        torch.arange(n)[:, None],
    )
    assert (out.num_committed == 1).all()
    return out.committed[:, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_and_top_p_are_tie_inclusive(impl):
    logits = _f32([[3.0, 1.0, 3.0, 3.0, 0.0, 2.0]])
    # top-k = 2 keeps all three tokens tied at the top.
    tokens = _sample_once_each(impl, logits, 1.0, 2, 1.0, 600)
    assert set(tokens.tolist()) == {0, 2, 3}
    # top-p = 0.5: nothing lies above the top group (kept whole), its mass is >= 0.5.
    tokens = _sample_once_each(impl, logits, 1.0, 0, 0.5, 600)
    assert set(tokens.tolist()) == {0, 2, 3}
    # top-p = 0.0 keeps only the most likely tokens too.
    tokens = _sample_once_each(impl, logits, 0.7, 0, 0.0, 600)
    assert set(tokens.tolist()) == {0, 2, 3}
    # top-p = 0.9 takes token 5 (mass above it 0.84), not token 1 (mass above 0.95).
    tokens = _sample_once_each(impl, logits, 1.0, 0, 0.9, 2000)
    assert set(tokens.tolist()) == {0, 2, 3, 5}


def test_top_p_mass_at_an_infinite_row_max():
    """A temperature so small that scaled logits overflow to +-inf: the tokens at the infinite
    max carry the max's mass (z - max z = inf - inf is taken as 0, not converted from NaN), so
    top-p < 1 keeps exactly them."""
    z = _f32([[3.0, -1.0, 3.0, 0.0, -2.0]]) / 1e-39
    assert z[0, 0] == float("inf") and z[0, 1] == float("-inf")
    keep = _filter_keep(z, _i64([0]), _f32([0.5]))
    assert keep.tolist() == [[True, False, True, False, False]]


def infinite_max_cases():
    """verify_block inputs (B = 1) whose scaled logits overflow, under several filters."""
    logits = _f32([[3.0, -1.0, 3.0, 0.0, -2.0] * 40])
    for top_k, top_p in [(0, 0.5), (3, 0.9), (0, 1.0)]:
        yield (
            torch.empty(1, 0, dtype=torch.int64),
            logits,
            _i64([7]),
            _i64([4]),
            _f32([1e-39]),
            _i64([top_k]),
            _f32([top_p]),
            _i64([11]),
            _i64([[-1]]),
            _i64([[3]]),
        )


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_agree_at_an_infinite_row_max(impl):
    for args in infinite_max_cases():
        for w, o in zip(verify_block_reference(*args), _run(impl, *args), strict=True):
            assert torch.equal(w, o)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Exact filtered target distribution, straight from the definition (no ties here)."""
    z = logits.double() / temperature
    order = z.argsort(descending=True)
    probs = torch.zeros_like(z)
    probs[order[:top_k]] = torch.softmax(z[order[:top_k]], -1)
    if top_p < 1:
        sorted_p = probs[order]
        probs[order[sorted_p.cumsum(0) - sorted_p >= top_p]] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("impl", ["sample_rows"] + IMPLS[1:])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.3, 8, 1.0), (0.8, 5, 0.9)])
def test_sampling_distribution_chi_square(impl, temperature, top_k, top_p):
    """Token frequencies of 20000 independently seeded draws against the exact filtered
    softmax: chi-square p-value > 1e-3 (fixed seeds, so the outcome is deterministic), and
    filtered-out tokens are never drawn."""
    n = 20000
    logits = _f32([[1.0, 2.5, 0.3, 2.0, -1.0, 1.7, 0.1, 2.9]])
    probs = _filtered_probs(logits[0], temperature, top_k, top_p)
    if impl == "sample_rows":
        tokens = sample_rows(
            logits.expand(n, 8),
            1000 + torch.arange(n),
            torch.full((n,), temperature),
            torch.full((n,), top_k),
            torch.full((n,), top_p),
            torch.arange(n),
        )
    else:
        tokens = _sample_once_each(impl, logits, temperature, top_k, top_p, n)
    counts = torch.bincount(tokens, minlength=8).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    stat = chisquare(counts[support].numpy(), (probs[support] * n).numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), probs.tolist(), stat)


def _random_case(bs: int, block: int, vocab: int, dtype: torch.dtype, seed: int):
    """A random verify_block input: per-request mixes of greedy / temperature / top-k / top-p,
    ragged budgets, stop ids, exact ties, and drafts planned to be accepted for a random
    number of positions (from the reference's own target tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = bs * block

    def pick(options, n=bs):
        return torch.tensor(options)[torch.randint(len(options), (n,), generator=g)]

    logits = torch.randn(rows, vocab, generator=g) * 2.0
    # A few peaked tokens per row, so samples concentrate and drafts get accepted.
    hot = torch.randint(vocab, (rows, 4), generator=g)
    logits.scatter_(1, hot, torch.rand(rows, 4, generator=g) * 6 + 4)
    # Exact ties at the row max in some rows: the lowest index must win.
    tied = torch.rand(rows, generator=g) < 0.3
    logits[tied, torch.randint(vocab, (int(tied.sum()),), generator=g)] = (
        logits[tied].max(-1).values
    )
    logits = logits.to(dtype)

    temperatures = pick([0.0, -1.0, 0.6, 1.0, 1.7])
    top_k = pick([0, 1, 3, 40, vocab, -2])
    top_p = pick([1.0, 0.95, 0.6, 0.0])
    seeds = torch.randint(-(2**62), 2**62, (bs,), generator=g)
    seq_lens = torch.randint(0, 5000, (bs,), generator=g) + pick([0, 2**33])
    remaining = torch.randint(-1, block + 2, (bs,), generator=g)
    k = torch.arange(block)
    per_row = lambda x: x.repeat_interleave(block)  # noqa: E731
    t = sample_rows(
        logits,
        (seq_lens[:, None] + k).flatten(),
        per_row(temperatures),
        per_row(top_k),
        per_row(top_p),
        per_row(seeds),
    ).view(bs, block)
    planned = torch.randint(0, block, (bs,), generator=g)
    planned[0] = block - 1  # every case has a fully accepted block
    drafts = torch.where(k[None, :-1] < planned[:, None], t[:, :-1], (t[:, :-1] + 1) % vocab)
    stops = torch.randint(vocab, (bs, 3), generator=g)
    stops[:, 0] = t[torch.arange(bs), torch.randint(block, (bs,), generator=g)]
    stops[torch.rand(bs, 3, generator=g) < 0.4] = -1
    slots = torch.randperm(rows * 3, generator=g)[:rows].view(bs, block)
    return (
        drafts.contiguous(),
        logits,
        seq_lens,
        remaining,
        temperatures.float(),
        top_k,
        top_p.float(),
        seeds,
        stops,
        slots,
    )


CASES = [  # (bs, B, V, dtype); few big vocabs so the suite stays fast
    (1, 16, 1000, torch.float32),
    (6, 4, 1000, torch.bfloat16),
    (9, 2, 1000, torch.float16),
    (4, 16, 1003, torch.float32),  # rows not 16-byte aligned
    (12, 4, 997, torch.bfloat16),
    (3, 16, 49152, torch.bfloat16),
    (1, 4, 151936, torch.bfloat16),
    (1, 2, 151936, torch.float16),
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("bs,block,vocab,dtype", CASES)
def test_kernel_matches_reference(impl, bs, block, vocab, dtype):
    for seed in range(2):
        args = _random_case(bs, block, vocab, dtype, seed=1000 * bs + 10 * block + seed)
        want = verify_block_reference(*args)
        got = _run(impl, *args)
        for name, w, o in zip(VerifyOutput._fields, want, got, strict=True):
            assert torch.equal(w, o), (name, w, o)
        assert want.accept_lens[0] == block - 1, "the planned drafts must be accepted"


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_without_stop_ids_and_large_batch(impl):
    args = list(_random_case(64, 4, 1000, torch.bfloat16, seed=7))
    args[8] = torch.empty(64, 0, dtype=torch.int64)
    want = verify_block_reference(*args)
    for w, o in zip(want, _run(impl, *args), strict=True):
        assert torch.equal(w, o)


@pytest.mark.skipif(not CUDA_KERNEL, reason="needs a GPU and dflare_sgl._C built with CUDA")
def test_cuda_graph_capture_and_replay():
    """One capturable launch: replaying a captured graph on new inputs matches the reference
    (this also checks that the kernel's per-request tickets reset themselves)."""
    cases = [_random_case(8, 16, 4096, torch.bfloat16, seed=s) for s in range(3)]
    static = [a.cuda() for a in cases[0]]
    verify_block(*static)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify_block(*static)
    for args in cases:
        for s, a in zip(static, args, strict=True):
            s.copy_(a)
        graph.replay()
        for w, o in zip(verify_block_reference(*args), out, strict=True):
            assert torch.equal(w, o.cpu())


def test_wrapper_validates_inputs():
    args = list(_random_case(2, 4, 100, torch.float32, seed=0))
    verify_block(*args)
    bad = dict(enumerate(args))
    with pytest.raises(ValueError, match="temperatures must be torch.float32"):
        verify_block(*{**bad, 4: args[4].double()}.values())
    with pytest.raises(ValueError, match=r"draft_tokens must have shape \[2, 3\]"):
        verify_block(*{**bad, 0: args[0][:, :2]}.values())
    with pytest.raises(ValueError, match=r"logits must have shape \[8, \*\]"):
        verify_block(*{**bad, 1: args[1][:4]}.values())
    with pytest.raises(ValueError, match="unit stride"):
        verify_block(*{**bad, 1: args[1].t().contiguous().t()}.values())
    with pytest.raises(ValueError, match="logits must be"):
        verify_block(*{**bad, 1: args[1].double()}.values())


# A fresh interpreter that imports nothing but torch and the package, then verifies one greedy
# block (target tokens 1 then 3, draft 1): through the raw op when the import registered it,
# else through the wrapper, which falls back to the PyTorch reference.
_FRESH_IMPORT = """
import torch
import dflare_sgl
from dflare_sgl.verify import VerifyOutput, verify_block

i64 = lambda x: torch.tensor(x, dtype=torch.int64)
logits = torch.zeros(2, 4)
logits[0, 1] = logits[1, 3] = 5.0
args = (i64([[1]]), logits, i64([7]), i64([9]), torch.zeros(1), i64([0]), torch.ones(1),
        i64([0]), i64([[-1]]), i64([[0, 1]]))
registered = hasattr(torch.ops.dflare, "verify_block")
out = VerifyOutput(*torch.ops.dflare.verify_block(*args)) if registered else verify_block(*args)
print(registered, out.committed.tolist())
"""


@pytest.mark.parametrize(
    "disable_ext",
    [
        pytest.param(
            "0",
            marks=pytest.mark.skipif(not _ext.extension_loaded(), reason="needs dflare_sgl._C"),
        ),
        "1",
    ],
)
def test_package_import_registers_ops(disable_ext):
    """`import dflare_sgl` alone makes torch.ops.dflare.* callable, as `import torchvision`
    does; with DFLARE_DISABLE_EXT=1 nothing is registered and the reference serves."""
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORT],
        env={**os.environ, "DFLARE_DISABLE_EXT": disable_ext},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert run.stdout.strip() == f"{disable_ext == '0'} [[1, 3]]"


def test_cuda_device_without_kernels_is_refused_or_warned(monkeypatch):
    """On CUDA the references would sync with the host every step: the SGLang worker refuses
    to start (require_gpu_kernels), the engine warns once (warn_without_gpu_kernels)."""
    monkeypatch.setenv("DFLARE_DISABLE_EXT", "1")
    caches = (_ext.extension_loaded, _ext._load_error, _ext._has_kernel, _ext._warn_once)
    for cached in caches:
        cached.cache_clear()
    try:
        _ext.require_gpu_kernels("cpu")  # CPU: the references are the CPU path's fallback
        _ext.warn_without_gpu_kernels("cpu")
        with pytest.raises(RuntimeError) as refused:
            _ext.require_gpu_kernels("cuda")
        message = str(refused.value)
        assert "layer_mix_kv, verify_block" in message and "DFLARE_DISABLE_EXT=1" in message
        assert "DFLARE_CUDA=1 bash scripts/install_package.sh" in message
        with pytest.warns(RuntimeWarning, match="running the PyTorch references") as warned:
            _ext.warn_without_gpu_kernels("cuda")
            _ext.warn_without_gpu_kernels(torch.device("cuda", 0))
        assert len(warned) == 1
    finally:
        monkeypatch.delenv("DFLARE_DISABLE_EXT")
        for cached in caches:
            cached.cache_clear()


@pytest.mark.skipif(not _ext.has_kernel("verify_block", "cpu"), reason="needs dflare_sgl._C")
def test_op_traces_under_torch_compile():
    """The op's fake kernel lets torch.compile(fullgraph=True) and torch.export trace it;
    opcheck checks schema, fake shapes and autograd registration against the real kernel."""
    args = _random_case(3, 4, 1000, torch.float32, seed=1)
    torch.library.opcheck(torch.ops.dflare.verify_block.default, args)

    @torch.compile(fullgraph=True)
    def committed_plus_one(*a):
        return torch.ops.dflare.verify_block(*a)[1] + 1

    assert torch.equal(committed_plus_one(*args), verify_block_reference(*args).committed + 1)
