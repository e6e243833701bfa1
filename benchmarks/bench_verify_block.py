"""verify_block speed: the extension kernel vs the PyTorch reference, against the read floor.

Each case is one verify_block call over random logits ``[bs*B, V]``; times are medians of
``--repeats`` runs after warmup (CUDA events on GPU, perf_counter on CPU). On GPU the kernel
is also timed inside a CUDA graph (``--graph-calls`` calls per replay), which removes host
launch overhead and shows the device time. ``floor`` = logits bytes / bandwidth, with the
bandwidth measured in the same run by a large device copy ((read + write) bytes / time).

    python benchmarks/bench_verify_block.py                  # GPU: bs=1 and bs=64, B=16, V=151936
    python benchmarks/bench_verify_block.py --device cpu --cases 4x16x32000
    python benchmarks/bench_verify_block.py --temperature 0.6 --top-k 20 --top-p 0.95
    python benchmarks/bench_verify_block.py --temperature 0.6 --top-p 0.95 --rows flat
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dflare_sgl import _ext
from dflare_sgl.verify import verify_block_reference

GPU_CASES = "1x16x151936,64x16x151936"
CPU_CASES = "1x16x32000,8x16x32000"


def _median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    numel = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / seconds


def _inputs(bs: int, block: int, vocab: int, args: argparse.Namespace) -> tuple:
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    rows = bs * block
    if args.rows == "peaked":  # a language model's shape: a few likely tokens over a low bulk
        logits = torch.randn(rows, vocab, device=dev, generator=g) * 1.5
        hot = torch.randint(vocab, (rows, 4), device=dev, generator=g)
        logits.scatter_(1, hot, torch.tensor([18.0, 16.0, 15.0, 14.0], device=dev).expand(rows, 4))
    else:
        logits = torch.randn(rows, vocab, device=dev, generator=g)
    logits = logits.to(getattr(torch, args.dtype))
    t = logits.float().view(bs, block, vocab).argmax(-1)
    drafts = t[:, :-1].clone()  # greedy drafts all accepted: the commit path is exercised too
    full = lambda value, dtype: torch.full((bs,), value, dtype=dtype, device=dev)  # noqa: E731
    return (
        drafts,
        logits,
        full(100, torch.int64),
        full(1 << 20, torch.int64),
        full(args.temperature, torch.float32),
        full(args.top_k, torch.int64),
        full(args.top_p, torch.float32),
        torch.arange(bs, device=dev),
        torch.full((bs, 1), -1, dtype=torch.int64, device=dev),
        torch.arange(bs * block, device=dev).view(bs, block),
    )


def _bench_case(bs: int, block: int, vocab: int, bandwidth: float, args: argparse.Namespace) -> str:
    dev = args.device
    inputs = _inputs(bs, block, vocab, args)
    nbytes = inputs[1].numel() * inputs[1].element_size()
    floor = nbytes / bandwidth
    ours = _median_seconds(
        lambda: torch.ops.dflare.verify_block(*inputs), dev, args.repeats, args.warmup
    )
    line = f"{f'{bs}x{block}x{vocab}':>18} {nbytes / 1e6:>10.1f} {floor * 1e6:>9.1f}"
    line += f" {ours * 1e6:>9.1f}"
    if dev == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.graph_calls):
                torch.ops.dflare.verify_block(*inputs)
        per_call = _median_seconds(graph.replay, dev, args.repeats, args.warmup) / args.graph_calls
        line += f" {per_call * 1e6:>9.1f} {per_call / floor:>11.2f}"
    else:
        line += f" {ours / floor:>10.2f}"
    if not args.no_reference:
        reps = max(3, args.repeats // 4)
        ref = _median_seconds(lambda: verify_block_reference(*inputs), dev, reps, 1)
        line += f" {ref * 1e6:>10.1f} {ref / ours:>9.1f}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    ap.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated bsxBxV (default GPU {GPU_CASES}, CPU {CPU_CASES})",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--temperature", type=float, default=0.0, help="<= 0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="<= 0: off")
    ap.add_argument("--top-p", type=float, default=1.0, help=">= 1: off")
    ap.add_argument(
        "--rows",
        default="peaked",
        choices=["peaked", "flat"],
        help="logits rows shaped like a language model's (peaked) or N(0, 1) (flat: top-p "
        "then keeps thousands of tokens and the kernel takes its radix fallback)",
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--graph-calls", type=int, default=20, help="kernel calls per CUDA graph")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    args = ap.parse_args()

    dev = args.device
    if not _ext.has_kernel("verify_block", dev):
        raise SystemExit(
            f"no dflare verify_block kernel for {dev}: build the extension with "
            "`pip install --no-build-isolation -e .`"
        )
    cases = [
        tuple(map(int, c.split("x")))
        for c in (args.cases or (GPU_CASES if dev == "cuda" else CPU_CASES)).split(",")
    ]
    bandwidth = _bandwidth(dev, args.repeats)
    name = (
        torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    mode = f"T={args.temperature} top_k={args.top_k} top_p={args.top_p} {args.rows} rows"
    mode = "greedy" if args.temperature <= 0 else mode
    print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; {args.dtype}, {mode}")

    header = f"{'bs x B x V':>18} {'logits MB':>10} {'floor us':>9} {'ours us':>9}"
    header += f" {'graph us':>9} {'graph/floor':>11}" if dev == "cuda" else f" {'ours/floor':>10}"
    header += "" if args.no_reference else f" {'ref us':>10} {'ref/ours':>9}"
    print(header)
    for bs, block, vocab in cases:
        print(_bench_case(bs, block, vocab, bandwidth, args))


if __name__ == "__main__":
    main()
