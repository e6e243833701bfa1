"""Host time of one verify-length decision in the SGLang DFLARE worker.

Every decode step of an adaptive DFLARE server records the previous step's time and chooses
the next length (:class:`dflare_sgl.sglang_plugin.adaptive_length.ServerVerifyLength`), before
the step's forward, on the scheduler's thread: plain steps pay it too, so it is overhead
against the plain server. This times ``begin_decode`` (record + choose) on a server state in which
``--batch-sizes`` batch sizes and every length 1 .. B have ``COST_WINDOW`` steps measured (a
server some minutes into mixed traffic), per batch size asked, median of ``--repeats`` loops.

    OMP_NUM_THREADS=1 python benchmarks/bench_server_decision.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from dflare_sgl.sglang_plugin.adaptive_length import COST_WINDOW, ServerVerifyLength


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, default=16, help="batch sizes measured")
    p.add_argument("--steps", type=int, default=50, help="decisions per loop")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rng = random.Random(0)
    server = ServerVerifyLength(args.block, range(1, args.block + 1), capacity=64)
    for b in range(1, args.batch_sizes + 1):
        for _ in range(COST_WINDOW):
            for n in range(1, args.block + 1):
                forward = (60.0 + 10.0 * b) * (1.0 if n == 1 else 1.5 + 0.1 * n)
                server.costs.record(n, b, forward + 2.0 * rng.random(), forward)
    rids = [f"r{i}" for i in range(args.batch_sizes)]
    print(f"| batch size | ms per decode step's begin_decode, median of {args.repeats} |")
    print("| --- | --- |")
    for b in sorted({1, args.batch_sizes // 2, args.batch_sizes}):
        loops = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):  # each records the step before it, then chooses
                server.begin_decode(rids[:b])
                server.forward_done()
            loops.append(1000.0 * (time.perf_counter() - start) / args.steps)
        print(f"| {b} | {statistics.median(loops):.3f} |")


if __name__ == "__main__":
    main()
