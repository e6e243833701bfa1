"""Does the adaptive verify length ever lose? Target alone vs fixed verify lengths vs adaptive.

For each draft and batch size, side by side in one process on the same prompts (HumanEval and
MT-Bench in turn, greedy, float32): the target alone (HF ``generate``), the engine verifying a
fixed n in ``--fixed`` tokens every step, and the engine choosing n each step
(:mod:`dflare_sgl.verify_length`) from this machine's calibrated step costs. All of them run
on each batch in turn; each cell is the median over ``--repeats`` of a repeat's tokens/s over
the target alone's in that repeat. The adaptive policy keeps its batch-wide acceptance record
from batch to batch, as in a server. In float32 every speculative output must equal the
target's (the run fails otherwise).

Drafts: ``untrained`` (random: nothing is accepted), ``bundled`` (the shipped draft), and
``oracle:P``: the test-only oracle (``python_tests/oracle_draft.py``) that drafts the target's
greedy continuation but errs with probability P at each position (P = 0.5: tau ~2, P = 0.2:
tau ~4 at B = 8), paying for a real draft pass each step.

On CPU (``--skinny-linear``, the default there) the target alone runs on the same
``skinny_linear`` kernel as the engine, so every ratio is drafting's alone.

    OMP_NUM_THREADS=2 python benchmarks/bench_verify_length.py --threads 2 \\
        --drafts untrained bundled oracle:0.5 oracle:0.2 --batch-sizes 1 4 8 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
from oracle_draft import OracleDecoder  # noqa: E402  (test-only machinery)

from dflare_sgl.bundled import default_draft  # noqa: E402
from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids  # noqa: E402
from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig  # noqa: E402
from dflare_sgl.engine import (  # noqa: E402
    SamplingParams,
    SpeculativeDecoder,
    pooled_tau,
    verify_length_counts,
)
from dflare_sgl.evaluation import hf_greedy  # noqa: E402
from dflare_sgl.prompts import load_prompts  # noqa: E402
from dflare_sgl.skinny_linear import use_skinny_linear  # noqa: E402
from dflare_sgl.target import load_target  # noqa: E402
from dflare_sgl.verify_length import FixedVerifyLength  # noqa: E402


def _draft(name: str, target, device: str) -> tuple[DFlareDraftModel, float | None]:
    """(draft model, oracle error rate or None)."""
    if name == "untrained":
        config = DraftConfig.for_target(target.config, num_draft_layers=2, block_size=8)
        draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(0))
        return draft.to(device), None
    if name.startswith("oracle:"):  # it pays for the bundled draft's pass (same shape, cost)
        bundled = DFlareDraftModel.from_pretrained(default_draft("smollm2-135m"), device=device)
        return bundled, float(name.split(":")[1])
    path = default_draft("smollm2-135m") if name == "bundled" else name
    return DFlareDraftModel.from_pretrained(path, device=device), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--drafts", nargs="+", default=["untrained", "bundled", "oracle:0.5", "oracle:0.2"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--fixed", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--prompts-per-set", type=int, default=8)
    ap.add_argument(
        "--min-prompts", type=int, default=8, help="prompts per row: max(this, batch size)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    target, tok = load_target("smollm2-135m", dtype=dtype, device=args.device)
    pairs = zip(
        load_prompts("humaneval", limit=args.prompts_per_set),
        load_prompts("mtbench", limit=args.prompts_per_set),
    )
    texts = [t for pair in pairs for t in pair]  # alternating, so any first N mix both
    prompts = encode_prompts(tok, texts, chat=True)
    stops = stop_token_ids(target, tok)
    cpu = args.device == "cpu"
    if cpu:
        use_skinny_linear(target)
    new = args.max_new_tokens
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"prompts={len(prompts)} "
        f"(humaneval + mtbench) max_new={new} repeats={args.repeats} skinny_linear={cpu}"
    )
    cols = [f"n={n}" for n in args.fixed] + ["adaptive"]
    print(f"{'draft':>12} {'bs':>3} {'alone tok/s':>12} " + "".join(f"{c:>10}" for c in cols)
          + "  tau(adaptive)  adaptive n histogram")
    params = SamplingParams(max_new_tokens=new, stop_token_ids=tuple(stops))
    for name in args.drafts:
        draft, error_rate = _draft(name, target, args.device)
        draft = draft.to(dtype)
        if cpu:
            use_skinny_linear(draft)
        if error_rate is None:
            decoder = SpeculativeDecoder(target, draft)
        else:
            decoder = OracleDecoder(target, draft, error_rate=error_rate)
        decoder.calibrate()
        policies = {f"n={n}": FixedVerifyLength(n) for n in args.fixed}
        policies["adaptive"] = decoder.verify_length

        def run(policy, batch, refs):
            """(seconds, results) of the engine with ``policy`` on one batch."""
            if error_rate is not None:
                decoder.set_references(batch, refs)
            start = time.perf_counter()
            results = decoder.generate(batch, params, verify_length=policy)
            return time.perf_counter() - start, results

        for bs in args.batch_sizes:
            chosen = prompts[: max(args.min_prompts, bs)]
            ratios: dict[str, list[float]] = {c: [] for c in cols}
            alone_tps = []
            for _ in range(args.repeats):
                # Every configuration runs on each batch in turn, so a slow spell of the
                # machine hits them all alike; a repeat's ratio is over its own target-alone.
                wall = dict.fromkeys(["alone", *cols], 0.0)
                tokens = 0
                adaptive_results = []
                for s in range(0, len(chosen), bs):
                    batch = chosen[s : s + bs]
                    alone = hf_greedy(target, batch, new, stops, batch_size=bs)
                    wall["alone"] += alone.wall_s
                    tokens += alone.num_tokens
                    for c, policy in policies.items():
                        seconds, results = run(policy, batch, alone.outputs)
                        wall[c] += seconds
                        # In bf16/fp16 an n-token pass and a 1-token decode round differently.
                        same = [r.tokens for r in results] == alone.outputs
                        if not same and dtype == torch.float32:
                            raise SystemExit(f"{name} bs={bs} {c}: output differs from the target's")
                        if c == "adaptive":
                            adaptive_results += results
                alone_tps.append(tokens / wall["alone"])
                for c in cols:
                    ratios[c].append(wall["alone"] / wall[c])
            counts = verify_length_counts(adaptive_results)
            steps = sum(counts.values())
            hist = " ".join(f"{n}:{c / steps:.0%}" for n, c in counts.items())
            print(
                f"{name:>12} {bs:>3} {statistics.median(alone_tps):12.1f} "
                + "".join(f"{statistics.median(ratios[c]):9.2f}x" for c in cols)
                + f"  {pooled_tau(adaptive_results):13.2f}  {hist}",
                flush=True,
            )

if __name__ == "__main__":
    main()
