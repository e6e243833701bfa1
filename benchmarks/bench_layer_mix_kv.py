"""Times layer_mix_kv: the fused op against its plain PyTorch reference.

The reference (``layer_mix_kv_reference``) IS the unfused path: mix -> hidden_norm -> per-layer
k/v linear -> k_norm -> RoPE -> scatter, one PyTorch op at a time. ``--compile`` also times it
under torch.compile. Reported times are medians of repeated runs (CUDA events on a GPU), next
to two floors measured in the same run:

  memory floor = essential bytes (hidden, weights, cache writes) / measured copy bandwidth
  matmul floor = projection (and DFlash fc) FLOPs / measured GEMM rate at the op's shapes

  python benchmarks/bench_layer_mix_kv.py                 # GPU: N=4096 H=4096 T=9 D=7 KVH=8 hd=128
  python benchmarks/bench_layer_mix_kv.py --device cpu    # a smaller float32 case
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from dflare_sgl._ext import has_kernel
from dflare_sgl.layer_mix import LayerMixWeights, layer_mix_kv, layer_mix_kv_reference
from dflare_sgl.primitives import build_cos_sin_cache

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULTS = {  # per device: tokens, hidden, target layers, draft layers, kv heads, head dim, dtype
    "cuda": dict(tokens=4096, hidden=4096, t=9, d=7, kv_heads=8, head_dim=128, dtype="bf16"),
    "cpu": dict(tokens=256, hidden=1024, t=9, d=5, kv_heads=4, head_dim=128, dtype="fp32"),
}


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def make_inputs(a: argparse.Namespace, device: torch.device):
    dtype, o = DTYPES[a.dtype], a.kv_heads * a.head_dim
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device, dtype)

    inv_freq = 1.0 / 10000 ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim)
    w = LayerMixWeights(
        fusion_probs=(
            torch.softmax(torch.randn(a.d, a.t, generator=gen), -1).to(device)
            if a.fusion == "dflare"
            else None
        ),
        fc_weight=rand(a.hidden, a.t * a.hidden, scale=0.01) if a.fusion == "dflash" else None,
        hidden_norm_weight=rand(a.hidden, scale=0.1, offset=1.0),
        k_proj_weight=rand(a.d, o, a.hidden, scale=a.hidden**-0.5),
        v_proj_weight=rand(a.d, o, a.hidden, scale=a.hidden**-0.5),
        k_proj_bias=rand(a.d, o, scale=0.1) if a.bias else None,
        v_proj_bias=rand(a.d, o, scale=0.1) if a.bias else None,
        k_norm_weight=rand(a.d, a.head_dim, scale=0.1, offset=1.0),
        eps=1e-6,
        cos_sin_cache=build_cos_sin_cache(inv_freq, 32768).to(device),
    )
    n, num_slots = a.tokens, 2 * a.tokens
    hidden = rand(n, a.t, a.hidden)
    positions = torch.randint(0, 32768, (n,), generator=gen).to(device)
    slots = torch.randperm(num_slots, generator=gen)[:n].to(device)
    cache_dtype = DTYPES[a.cache_dtype or a.dtype]

    def caches() -> list[torch.Tensor]:
        shape = (num_slots, a.kv_heads, a.head_dim)
        return [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(a.d)]

    return hidden, w, positions, slots, caches(), caches()


def floors_ms(a: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(memory floor, matmul floor) in ms, from the copy bandwidth and GEMM rate measured here."""
    dtype, o = DTYPES[a.dtype], a.kv_heads * a.head_dim
    item, cache_item = dtype.itemsize, DTYPES[a.cache_dtype or a.dtype].itemsize
    fc_params = a.hidden * a.t * a.hidden if a.fusion == "dflash" else 0
    essential = (
        a.tokens * a.t * a.hidden * item  # hidden, read once
        + (2 * a.d * o * a.hidden + fc_params) * item  # weights
        + 2 * a.d * a.tokens * o * cache_item  # K and V stored
    )
    buf = torch.empty(
        256 << 20 if device.type == "cuda" else 64 << 20, dtype=torch.uint8, device=device
    )
    dst = torch.empty_like(buf)
    copy_ms = median_ms(lambda: dst.copy_(buf), device, a.repeats, a.warmup)
    bandwidth = 2 * buf.numel() / (copy_ms * 1e-3)  # bytes read + written per second

    x = torch.randn(a.d, a.tokens, a.hidden, device=device, dtype=dtype)
    wt = torch.randn(a.d, o, a.hidden, device=device, dtype=dtype).transpose(1, 2)
    gemm_ms = median_ms(lambda: torch.bmm(x, wt), device, a.repeats, a.warmup)
    rate = 2 * a.d * a.tokens * a.hidden * o / (gemm_ms * 1e-3)
    flops = 2 * a.tokens * a.hidden * (2 * a.d * o) + 2 * a.tokens * fc_params
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, GEMM rate {rate / 1e12:.1f} TFLOP/s")
    print(f"essential traffic {essential / 1e6:.0f} MB, projection FLOPs {flops / 1e9:.1f} G")
    return essential / bandwidth * 1e3, flops / rate * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, help="N, new tokens")
    p.add_argument("--hidden", type=int, help="H")
    p.add_argument("--t", type=int, help="T, captured target layers")
    p.add_argument("--d", type=int, help="D, draft layers")
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--cache-dtype", choices=DTYPES, help="default: --dtype")
    p.add_argument("--fusion", choices=["dflare", "dflash"], default="dflare")
    p.add_argument("--bias", action="store_true", help="k/v projections with bias")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    device = torch.device(a.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    print(
        f"{device.type}: N={a.tokens} H={a.hidden} T={a.t} D={a.d} KVH={a.kv_heads} "
        f"hd={a.head_dim} {a.dtype} -> {a.cache_dtype or a.dtype} cache, {a.fusion}"
        f"{' +bias' if a.bias else ''}, threads={torch.get_num_threads()}"
    )
    hidden, w, positions, slots, k_caches, v_caches = make_inputs(a, device)
    ref_k, ref_v = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    candidates = {"unfused (reference)": layer_mix_kv_reference}
    if a.compile:
        candidates["torch.compile(reference)"] = torch.compile(layer_mix_kv_reference)
    if has_kernel("layer_mix_kv", device):
        candidates["ours (fused op)"] = layer_mix_kv
    else:
        print("note: dflare_sgl._C has no kernel for this device, only the reference is timed")

    layer_mix_kv_reference(hidden, w, positions, slots, ref_k, ref_v)
    memory_floor, matmul_floor = floors_ms(a, device)
    print(f"{'memory floor':>26}: {memory_floor:8.3f} ms")
    print(f"{'matmul floor':>26}: {matmul_floor:8.3f} ms")
    for name, fn in candidates.items():
        run = functools.partial(fn, hidden, w, positions, slots, k_caches, v_caches)
        ms = median_ms(run, device, a.repeats, a.warmup)
        err = max(
            (c.float() - r.float()).abs().max().item()
            for c, r in zip(k_caches + v_caches, ref_k + ref_v, strict=True)
        )
        bound = max(memory_floor, matmul_floor)
        print(f"{name:>26}: {ms:8.3f} ms  ({bound / ms:5.1%} of floor, max |diff| {err:.2e})")


if __name__ == "__main__":
    main()
