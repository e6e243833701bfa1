"""Held-out acceptance of drafts, with standard errors: the measure #20's data-scaling curve
reads (tau is counted, not timed, so it may run beside other work).

For each draft and each fixed verify length B (``--block-sizes``; "draft" = the draft's own
block), greedy speculative decoding of the first ``--limit`` prompts of each set at batch size
``--batch-size`` (default 1; the outputs are the same at any batch size, and the drafts' only
differ by float rounding of batched GEMMs) in float32; per set: pooled tau (committed tokens over verify steps) and the standard error
of the per-prompt tau mean; with two or more drafts, the paired difference to the first one
(per prompt, same prompts) and its standard error, which is far tighter than either tau's.
Every draft's outputs must equal the first draft's token for token (each is lossless, so both
are the target's greedy text); a difference stops the run.

    OMP_NUM_THREADS=1 python benchmarks/bench_tau.py --drafts bundled runs/a runs/b \
        --sets humaneval mtbench --limit 64 --max-new-tokens 64 --block-sizes 4 draft
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from dflare_sgl import evaluation
from dflare_sgl.bundled import bundled_draft
from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.draft_model import DFlareDraftModel
from dflare_sgl.engine import SpeculativeDecoder, pooled_tau
from dflare_sgl.prompts import load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafts", nargs="+", default=["bundled"], help='folders, or "bundled"')
    ap.add_argument("--sets", nargs="+", default=["humaneval", "mtbench"])
    ap.add_argument("--limit", type=int, default=64, help="first N prompts of each set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-sizes", nargs="+", default=["4", "draft"])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--json", help="also write the per-prompt taus here")
    args = ap.parse_args()

    target, tokenizer = load_target(args.target, dtype=torch.float32, device="cpu")
    use_skinny_linear(target)
    stops = stop_token_ids(target, tokenizer)
    prompts = {
        s: encode_prompts(tokenizer, load_prompts(s, limit=args.limit), chat=True)
        for s in args.sets
    }
    per_prompt: dict[str, dict[str, list[float]]] = {}  # draft -> "B/set" -> per-prompt taus
    rows = []
    reference_outputs: dict[str, list[list[int]]] = {}
    for index, name in enumerate(args.drafts):
        folder = bundled_draft(args.target) if name == "bundled" else Path(name)
        draft = DFlareDraftModel.from_pretrained(folder, dtype=torch.float32)
        for b in args.block_sizes:
            block = draft.block_size if b == "draft" else int(b)
            decoder = SpeculativeDecoder(target, draft, block_size=block)
            for s, ids in prompts.items():
                run = evaluation.speculative(
                    decoder, ids, args.max_new_tokens, stops, args.batch_size
                )
                key = f"{b}/{s}"
                if key in reference_outputs and run.outputs != reference_outputs[key]:
                    raise AssertionError(f"{name} at B={block} on {s}: outputs differ")
                reference_outputs.setdefault(key, run.outputs)
                taus = [r.tau for r in run.results]
                per_prompt.setdefault(f"{index}: {name}", {})[key] = taus
                rows.append((index, name, block, b, s, pooled_tau(run.results), taus))
                print(f"{name} B={block} {s}: tau {pooled_tau(run.results):.3f}", flush=True)

    first = per_prompt[f"0: {args.drafts[0]}"]
    print(
        f"\n{args.target} fp32, bs {args.batch_size}, greedy, first {args.limit} prompts per set, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} thread(s)\n"
    )
    print("| draft | B | set | tau | SE | vs first draft (paired) |\n|---|---:|---|---:|---:|---:|")
    for index, name, block, b, s, tau, taus in rows:
        paired = ""
        if index > 0:
            diff = [x - y for x, y in zip(taus, first[f"{b}/{s}"], strict=True)]
            paired = f"{statistics.mean(diff):+.3f} +- {_se(diff):.3f}"
        print(f"| {name} | {block} | {s} | {tau:.3f} | {_se(taus):.3f} | {paired} |")
    if args.json:
        Path(args.json).write_text(json.dumps(per_prompt, indent=1) + "\n")


if __name__ == "__main__":
    main()
