"""skinny_linear speed: the CPU kernel vs torch's F.linear (the reference) on a target's weights.

One "pass" multiplies M rows (a decode step: 1, a verify pass: the block) by every weight
matrix of a decoder (per layer q, k, v, o, gate, up, down, then the lm_head), with the shapes
of ``--target``'s config and random float32 weights. Times are medians of ``--repeats`` passes
after warmup. ``floor`` = weight bytes / bandwidth, the bandwidth measured in the same run by a
large ``sum`` (read only): a pass cannot beat it, and a 1-row pass is bound by it.

    OMP_NUM_THREADS=2 python benchmarks/bench_skinny_linear.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from dflare_sgl import _ext
from dflare_sgl.skinny_linear import MAX_ROWS
from dflare_sgl.target import resolve_target


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _weights(target: str, gen: torch.Generator) -> list[torch.Tensor]:
    """Every weight matrix of one decoder pass, ``[N, K]`` float32, in call order."""
    c = AutoConfig.from_pretrained(resolve_target(target), local_files_only=True)
    h, i = c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    shapes = layer * c.num_hidden_layers + [(c.vocab_size, h)]
    return [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m", help="whose layer shapes to use")
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(1, MAX_ROWS + 1)))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    if not _ext.has_kernel("skinny_linear", torch.device("cpu")):
        raise SystemExit("the extension is not built: bash scripts/setup_env.sh")

    gen = torch.Generator().manual_seed(0)
    weights = _weights(args.target, gen)
    nbytes = sum(w.numel() * 4 for w in weights)
    big = torch.randn(nbytes // 4, generator=gen)
    print(f"target={args.target} weights={nbytes / 2**20:.0f} MiB float32, median of "
          f"{args.repeats} passes, ms per pass")
    print("| threads | rows | F.linear ms | skinny_linear ms | speedup | floor ms | "
          "F.linear / its 1-row pass | skinny / its 1-row pass |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        floor = _median_ms(big.sum, args.repeats)
        first: dict[str, float] = {}
        for m in args.rows:
            x = {k: torch.randn(m, k, generator=gen) for k in {w.shape[1] for w in weights}}

            def torch_pass(x: dict[int, torch.Tensor] = x) -> None:
                for w in weights:
                    F.linear(x[w.shape[1]], w)

            def skinny_pass(x: dict[int, torch.Tensor] = x) -> None:
                for w in weights:
                    torch.ops.dflare.skinny_linear(x[w.shape[1]], w, None)

            ref, ours = _median_ms(torch_pass, args.repeats), _median_ms(skinny_pass, args.repeats)
            first.setdefault("ref", ref)
            first.setdefault("ours", ours)
            print(f"| {threads} | {m} | {ref:.1f} | {ours:.1f} | {ref / ours:.2f}x | {floor:.1f} "
                  f"| {ref / first['ref']:.2f} | {ours / first['ours']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
