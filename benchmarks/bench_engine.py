"""End-to-end decoding speed: target-only greedy (HF ``generate``) vs speculative decoding.

Both run side by side in one process on the same prompts, target and dtype (the runs of
:mod:`dflare_sgl.evaluation`, as in ``dflare demo``), interleaved ``--repeats`` times; each row
is the median. Speedup = tokens/s over the target-only tokens/s at the same batch size. In
float32 the speculative output must be token-identical to the target's greedy output (the run
fails otherwise); in bf16/fp16 a B-token verify pass and a 1-token decode round differently, so
near-ties can flip and the table reports how many outputs are identical.

    OMP_NUM_THREADS=2 python benchmarks/bench_engine.py --threads 2 --prompts mtbench --limit 8
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --batch-size 1 4 8

The draft defaults to the bundled one of a built-in target; ``--draft untrained`` uses a fresh
random draft (tau ~ 1), which measures the engine's cost per step rather than a speedup.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dflare_sgl.bundled import default_draft
from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SpeculativeDecoder, pooled_tau
from dflare_sgl.evaluation import hf_greedy, speculative
from dflare_sgl.prompts import PROMPT_SETS, load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m", help="offline alias or HF folder")
    ap.add_argument(
        "--draft",
        default=None,
        help="draft folder, or 'untrained' (default: the target's bundled draft)",
    )
    ap.add_argument("--prompts", default="mtbench", choices=sorted(PROMPT_SETS))
    ap.add_argument("--limit", type=int, default=8, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--skinny-linear",
        action="store_true",
        help="run the target's and draft's linears, HF greedy included, on "
        "torch.ops.dflare.skinny_linear (CPU): the speedup is then drafting's alone",
    )
    ap.add_argument(
        "--full-draft-vocab",
        action="store_true",
        help="let the draft propose every token, not only its draft_vocab_ids (the bundled "
        "draft's 8192): what the reduced head costs in tau and saves in time",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    target, tok = load_target(args.target, dtype=dtype, device=args.device)
    draft_path = args.draft or default_draft(args.target)
    if draft_path is None or draft_path == "untrained":
        draft_path = "untrained"
        config = DraftConfig.for_target(target.config, num_draft_layers=5)
        draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(0))
        draft = draft.to(device=args.device, dtype=dtype)
    else:
        draft = DFlareDraftModel.from_pretrained(draft_path, dtype=dtype, device=args.device)
    if args.full_draft_vocab:
        draft.set_draft_vocab(None)
    if args.skinny_linear:
        use_skinny_linear(target, draft)
    decoder = SpeculativeDecoder(target, draft, block_size=args.block_size)
    prompts = encode_prompts(tok, load_prompts(args.prompts, limit=args.limit), chat=True)
    stops = stop_token_ids(target, tok)

    print(
        f"target={args.target} draft={draft_path} device={args.device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} B={decoder.block_size} "
        f"verify={'adaptive' if decoder.adaptive else 'fixed'} prompts={len(prompts)} "
        f"({args.prompts}) max_new={args.max_new_tokens} repeats={args.repeats} "
        f"skinny_linear={args.skinny_linear} draft_vocab={draft.config.draft_vocab_size or 'all'}"
    )
    print(
        f"{'bs':>3} {'target-only tok/s':>18} {'dflare tok/s':>13} {'speedup':>8} {'tau':>6} "
        f"{'identical':>10}"
    )
    for bs in args.batch_size:
        ref_tps, ours_tps = [], []
        for _ in range(args.repeats):
            ref = hf_greedy(target, prompts, args.max_new_tokens, stops, batch_size=bs)
            ours = speculative(decoder, prompts, args.max_new_tokens, stops, batch_size=bs)
            same = sum(a == b for a, b in zip(ours.outputs, ref.outputs, strict=True))
            if dtype == torch.float32 and same < len(prompts):
                raise SystemExit(f"bs={bs}: float32 speculative output differs from HF greedy")
            ref_tps.append(ref.tokens_per_s)
            ours_tps.append(ours.tokens_per_s)
        base, mine = statistics.median(ref_tps), statistics.median(ours_tps)
        tau = pooled_tau(ours.results)
        print(
            f"{bs:>3} {base:18.1f} {mine:13.1f} {mine / base:8.2f} {tau:6.2f} "
            f"{f'{same}/{len(prompts)}':>10}",
            flush=True,
        )


if __name__ == "__main__":
    main()
