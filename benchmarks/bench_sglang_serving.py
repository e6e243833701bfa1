"""Serving throughput of ``dflare serve`` (DFLARE) vs the same server without speculation,
measured by SGLang's own ``python -m sglang.bench_serving``.

    python benchmarks/bench_sglang_serving.py --device cpu \\
        --drafts untrained bundled oracle:0.2 oracle:0.45 --modes adaptive fixed \\
        --concurrency 1 4 8 16

Drafts: ``untrained`` (random weights, the bundled draft's shape), ``bundled`` (the package's
draft for the target), a checkpoint folder, or ``oracle:P``: the test-only oracle worker
(``python_tests/sglang_test_workers.py``) drafting the target's greedy continuation with each
token wrong with probability P (accept length ~4 at 0.2 and ~2 at 0.45 for block 8), over the
bundled draft's weights so that a step pays for a real draft pass. The oracle's continuations
are recorded first, in an untimed pass over the same prompts (DFLARE is lossless, so they are
the target's greedy ones). Modes: ``adaptive`` (the verify length chosen each step, the
default), ``fixed`` (the whole block every step, ``--speculative-num-draft-tokens B``) or
``fixed:N``.

Every server runs in its own process group and is killed by its group id afterwards
(:class:`dflare_sgl.sglang_plugin.server_process.ServerProcess`); ``dflare serve`` runs the
CPU server with ``OMP_NUM_THREADS=1`` unless the variable is set. Prompts: SGLang's
random-ids dataset, fixed lengths, seed 0, ``4 x concurrency`` prompts per cell, greedy,
``ignore_eos``. Prints one markdown table: output tokens/s of each server per concurrency,
the ratio to the plain server of the same round (median over ``--repeats`` rounds, each of
which restarts every server), SGLang's accept length, and the verify lengths DFLARE chose
(``dflare_verify_lengths`` of ``/server_info``). On CPU every server runs its few-row linears
on ``skinny_linear``; ``--sglang-linears`` adds the plain server on SGLang's own (the kernel's
share, apart from drafting's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import requests
import torch
from tqdm import tqdm

from dflare_sgl.bundled import default_draft
from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.sglang_plugin.cpu_linears import ENV_SWITCH
from dflare_sgl.sglang_plugin.server_process import ServerProcess
from dflare_sgl.target import resolve_target

TESTS = Path(__file__).resolve().parents[1] / "python_tests"


def _serve_args(args, draft: str | None, mode: str) -> list[str]:
    serve = ["--device", args.device, "--target", args.target]
    serve += ["--draft", draft] if draft else ["--no-speculation"]
    sglang = ["--dtype", args.dtype, "--disable-cuda-graph", "--decode-log-interval", "1"]
    if draft and mode.startswith("fixed"):
        config = DraftConfig.from_dict(json.loads((Path(draft) / "config.json").read_text()))
        block = mode.partition(":")[2] or str(config.block_size)
        sglang += ["--speculative-num-draft-tokens", block]
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


def _verify_lengths(url: str) -> dict | None:
    state = requests.get(f"{url}/server_info", timeout=60).json()["internal_states"][0]
    return state.get("dflare_verify_lengths")


def _worker_env(worker: str, **files: Path) -> dict[str, str]:
    """The environment that makes the server run a test-only worker from python_tests."""
    env = {"DFLARE_SGLANG_WORKER": f"sglang_test_workers:{worker}", "PYTHONPATH": str(TESTS)}
    return env | {name: str(path) for name, path in files.items()}


def _untrained(bundled: Path, out: Path) -> Path:
    """A random-weight draft of the bundled draft's shape and draft vocabulary."""
    trained = DFlareDraftModel.from_pretrained(bundled)
    untrained = DFlareDraftModel(trained.config, generator=torch.Generator().manual_seed(0))
    untrained.set_draft_vocab(trained.draft_vocab_ids)
    untrained.save_pretrained(out)
    return out


def _record_continuations(args, draft: Path, work: Path) -> list[dict]:
    """The target's greedy continuation of every benchmark prompt (untimed)."""
    record = work / "continuations.jsonl"
    env = _worker_env("ContinuationRecordingWorker", DFLARE_TEST_RECORD_OUTPUTS=record)
    server_args = _serve_args(args, str(draft), "fixed:2")
    with ServerProcess(server_args, work / "server_record.log", args.start_timeout, env) as url:
        for c in tqdm(args.concurrency, desc="recording the oracle's continuations"):
            _bench(args, url, c, work / f"record_{c}.jsonl")
    entries = {}
    for line in record.read_text().splitlines():
        e = json.loads(line)
        entries[tuple(e["prompt"])] = e
    return list(entries.values())


def _summary(lengths: dict | None) -> str:
    if not lengths:
        return "-"
    steps = {int(n): c for n, c in lengths["steps_by_length"].items()}
    total = sum(steps.values()) or 1
    mean = sum(n * c for n, c in steps.items()) / total
    top = sorted(steps.items(), key=lambda kv: -kv[1])[:3]
    return f"mean {mean:.2f}; " + ", ".join(f"n={n} {100 * c / total:.0f}%" for n, c in top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafts", nargs="+", default=["untrained", "bundled"])
    p.add_argument("--modes", nargs="+", default=["adaptive"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--prompts-per-slot", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="rounds over every server")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--bench-timeout", type=float, default=900)
    p.add_argument("--sglang-linears", action="store_true", help="also the plain server on "
                   "SGLang's own CPU linears (DFLARE_SKINNY_LINEAR=0): the kernel's share")
    p.add_argument("--json", type=Path, help="also write every cell (with /server_info's "
                   "dflare_verify_lengths) to this file")
    args = p.parse_args()
    target_name, args.target = args.target, str(resolve_target(args.target))
    work = Path(tempfile.mkdtemp(prefix="bench_sglang_"))
    bundled = default_draft(target_name)
    untrained = _untrained(bundled, work / "untrained")

    servers: list[tuple[str, str, str | None, dict]] = [("none", "-", None, {})]
    if args.sglang_linears:
        servers.append(("none, SGLang linears", "-", None, {ENV_SWITCH: "0"}))
    entries = None
    for name in args.drafts:
        for mode in args.modes:
            if name == "untrained":
                servers.append((name, mode, str(untrained), {}))
            elif name == "bundled":
                servers.append((name, mode, str(bundled), {}))
            elif name.startswith("oracle:"):
                if entries is None:
                    entries = _record_continuations(args, untrained, work)
                spec = work / f"{name.replace(':', '_')}.json"
                spec.write_text(json.dumps({"entries": entries, "error_rate": float(name[7:])}))
                env = _worker_env("OracleDraftWorker", DFLARE_TEST_ORACLE=spec)
                servers.append((name, mode, str(bundled), env))
            else:
                servers.append((name, mode, name, {}))

    # Each round runs every server (in reverse order every other round, so drift over the run
    # falls on both sides); a cell's ratio is the median over rounds of its ratio to the plain
    # server of the same round.
    results: dict[tuple, list[tuple]] = {}
    bar = tqdm(total=args.repeats * len(servers) * len(args.concurrency), desc="bench_serving runs")
    for r in range(args.repeats):
        order = list(enumerate(servers))
        for i, (name, mode, draft, env) in order[:: -1 if r % 2 else 1]:
            log = work / f"server_{r}_{i}.log"
            with ServerProcess(_serve_args(args, draft, mode), log, args.start_timeout, env) as url:
                previous = None
                for c in args.concurrency:
                    out = _bench(args, url, c, work / f"run_{r}_{i}_{c}.jsonl")
                    # The histogram is cumulative over the server's life: keep the cell's part.
                    lengths = _verify_lengths(url) if draft else None
                    cell = _difference(lengths, previous)
                    previous = lengths
                    results.setdefault((name, mode, c), []).append(
                        (out["output_throughput"], out.get("accept_length"), cell)
                    )
                    bar.update()
        # Each finished round is reported (and written) at once: a run cut short keeps it.
        _report(args, servers, results, r + 1, work)
    bar.close()


def _report(args, servers, results: dict[tuple, list[tuple]], done: int, work: Path) -> None:
    if args.json:
        cells = [
            {"draft": k[0], "mode": k[1], "concurrency": k[2],
             "rounds": [{"output_throughput": t, "accept_length": a, "dflare_verify_lengths": v}
                        for t, a, v in rounds]}
            for k, rounds in results.items()
        ]  # fmt: skip
        args.json.write_text(json.dumps(cells, indent=1))

    print(f"threads: OMP_NUM_THREADS per server as `dflare serve` sets it; work dir {work}")
    print(f"{done} round(s); vs plain: median over rounds (range)")
    columns = ["draft", "mode", "concurrency", "output tok/s", "vs plain", "accept length"]
    columns.append("verify lengths")
    print("| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|")
    for name, mode, draft, _ in servers:
        for c in args.concurrency:
            rounds = results[(name, mode, c)]
            plain = [t for t, _, _ in results[("none", "-", c)]]
            ratios = [t / p for (t, _, _), p in zip(rounds, plain)]
            accepts = [a for _, a, _ in rounds if a is not None]
            accept = f"{statistics.median(accepts):.2f}" if accepts else "-"
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            print(
                f"| {name} | {mode} | {c} | {statistics.median(t for t, _, _ in rounds):.1f} | "
                f"{statistics.median(ratios):.2f}x{spread} | {accept} | "
                f"{_summary(_summed([v for _, _, v in rounds]))} |",
                flush=True,
            )


def _summed(cells: list[dict | None]) -> dict | None:
    """The verify-length histogram of one cell over all rounds."""
    if not cells or cells[0] is None:
        return None
    steps: dict[str, int] = {}
    for cell in cells:
        for n, count in cell["steps_by_length"].items():
            steps[n] = steps.get(n, 0) + count
    return {"steps_by_length": steps}


def _difference(lengths: dict | None, previous: dict | None) -> dict | None:
    """The steps of one cell: the server's histogram minus the previous cell's."""
    if lengths is None or previous is None:
        return lengths
    before = previous["steps_by_length"]
    steps = {n: c - before.get(n, 0) for n, c in lengths["steps_by_length"].items()}
    return {**lengths, "steps_by_length": {n: c for n, c in steps.items() if c > 0}}


if __name__ == "__main__":
    main()
