"""Serving throughput of ``dflare serve`` (DFLARE) vs the same server without speculation,
measured by SGLang's own ``python -m sglang.bench_serving``.

    python benchmarks/bench_sglang_serving.py --device cpu --draft DRAFT_DIR

For each server (DFLARE, then the target alone) it starts ``dflare serve``, runs
``sglang.bench_serving`` (random-ids prompts, fixed lengths) at each concurrency, and prints
one markdown table: output tokens/s and SGLang's average accept length per setting. Every
server runs in its own process group and is killed by its group id afterwards
(:class:`dflare_sgl.sglang_plugin.server_process.ServerProcess`). Pin threads for
stable numbers (the script passes ``OMP_NUM_THREADS`` through; ``dflare serve`` defaults it
to 1 on CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from dflare_sgl.sglang_plugin.server_process import ServerProcess
from dflare_sgl.target import resolve_target


def _serve_args(args, speculative: bool) -> list[str]:
    serve = ["--device", args.device, "--target", args.target]
    serve += ["--draft", args.draft] if speculative else ["--no-speculation"]
    sglang = ["--dtype", args.dtype, "--disable-cuda-graph", "--decode-log-interval", "1"]
    return serve + ["--", *sglang]


def _bench(args, url: str, concurrency: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang"]
    cmd += ["--base-url", url, "--tokenizer", args.target]
    cmd += ["--dataset-name", "random-ids", "--random-range-ratio", "1"]
    cmd += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    cmd += ["--num-prompts", str(args.prompts_per_slot * concurrency)]
    cmd += ["--max-concurrency", str(concurrency), "--seed", "0", "--disable-tqdm"]
    cmd += ["--output-file", str(out)]
    subprocess.run(cmd, check=True, timeout=args.bench_timeout, capture_output=True)
    return json.loads(out.read_text().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", required=True, help="DFlare draft checkpoint folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--prompts-per-slot", type=int, default=4)
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--bench-timeout", type=float, default=900)
    args = p.parse_args()
    args.target = str(resolve_target(args.target))
    work = Path(tempfile.mkdtemp(prefix="bench_sglang_"))
    rows = []
    bar = tqdm(total=2 * len(args.concurrency), desc="bench_serving runs")
    for name, speculative in (("DFLARE", True), ("none", False)):
        server = ServerProcess(
            _serve_args(args, speculative), work / f"server_{name}.log", args.start_timeout
        )
        with server as url:
            for c in args.concurrency:
                r = _bench(args, url, c, work / f"{name}_{c}.jsonl")
                rows.append((name, c, r["output_throughput"], r.get("accept_length")))
                bar.update()
    bar.close()
    print("| speculation | concurrency | output tok/s | accept length |")
    print("| --- | --- | --- | --- |")
    for name, c, tput, accept in rows:
        print(f"| {name} | {c} | {tput:.1f} | {accept if accept is None else f'{accept:.2f}'} |")


if __name__ == "__main__":
    main()
