"""Where one speculative step's time goes, against one target-only decode token.

Runs the engine at bs=1 under ``torch.profiler`` and splits each draft + verify step into the
regions the engine labels (``dflare.*``): the draft pass, the draft's token head, the target
verify pass, ``verify_block`` and the commit (target-cache crop plus ``layer_mix_kv``). What
the labels leave over is Python and bookkeeping. The target-only cost is HF ``generate``'s
time per token on the same prompts, measured in the same run. Every block size x draft depth
in the sweep uses an untrained draft (tau ~ 1: one step per token, the steady-state cost), and
each number is the median over ``--repeats`` runs. The profiler adds ~10 ms to a CPU step
(it records every aten op of the target pass), so the cost ratio ``engine / target`` comes
from unprofiled runs and the profiled split only says where the time goes.

The column to read is ``engine / target``: the CPU speedup is about tau divided by it.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --threads 1 --block-sizes 4 8 16 \\
        --layers 1 2 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target

REGIONS = ("draft", "draft_head", "target_verify", "verify_block", "commit")


def _region_ms(prof: profile, steps: int) -> dict[str, float]:
    """Per-step milliseconds of ``dflare.step`` and each of its labelled parts (the
    profiler's times are in microseconds)."""
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    return {r: totals.get(f"dflare.{r}", 0.0) / 1e3 / steps for r in ("step", *REGIONS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--prompts", default="mtbench", choices=["mtbench", "humaneval"])
    ap.add_argument("--limit", type=int, default=2, help="prompts per measurement")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--draft-head-dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: the engine's choice (bfloat16 for an fp32 target on CPU)")
    ap.add_argument("--skinny-linear", action="store_true",
                    help="run the target's and draft's linears (target-only decoding included) "
                         "on torch.ops.dflare.skinny_linear")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="restrict the draft's token head to N token ids (the bundled draft "
                         "has 8192; which ids does not change the cost)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (state them)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_target(args.target, dtype=torch.float32, device="cpu")
    if args.skinny_linear:
        use_skinny_linear(model)
    texts = load_prompts(args.prompts, limit=args.limit)
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for t in texts
    ]
    n = args.max_new_tokens
    # No stop tokens: every run makes exactly n tokens, so steps are comparable.
    params = SamplingParams(max_new_tokens=n)

    def target_ms_per_token() -> float:
        t0 = time.perf_counter()
        for ids in prompts:
            inp = torch.tensor([ids])
            model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.eos_token_id)
        return (time.perf_counter() - t0) * 1e3 / (n * len(prompts))

    head_dtype = getattr(torch, args.draft_head_dtype) if args.draft_head_dtype else None
    print(f"target={args.target} fp32 CPU threads={args.threads} bs=1 prompts={len(prompts)} "
          f"max_new={n} repeats={args.repeats} draft_head_dtype={args.draft_head_dtype or 'auto'} "
          f"skinny_linear={args.skinny_linear} draft_vocab={args.draft_vocab or 'all'}")
    header = ["B", "D", "target ms/token", "engine ms/token", "engine / target",
              "profiled step ms", *REGIONS, "other"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for layers in args.layers:
        for block in args.block_sizes:
            torch.manual_seed(0)
            draft = DFlareDraftModel(DraftConfig.for_target(
                model.config, num_draft_layers=layers, block_size=block)).eval()
            if args.draft_vocab:
                draft.set_draft_vocab(torch.arange(args.draft_vocab))
            if args.skinny_linear:
                use_skinny_linear(draft)
            decoder = SpeculativeDecoder(model, draft, draft_head_dtype=head_dtype)
            decoder.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up
            rows = []
            for _ in range(args.repeats):
                token = target_ms_per_token()
                t0 = time.perf_counter()  # unprofiled, prefill included as in the target's
                for ids in prompts:
                    decoder.generate([ids], params)
                engine = (time.perf_counter() - t0) * 1e3 / (n * len(prompts))
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    results = [decoder.generate([ids], params)[0] for ids in prompts]
                steps = sum(len(r.accept_lengths) for r in results)
                rows.append((token, engine, _region_ms(prof, steps)))
            token = statistics.median(r[0] for r in rows)
            engine = statistics.median(r[1] for r in rows)
            parts = {k: statistics.median(r[2][k] for r in rows) for k in ("step", *REGIONS)}
            step = parts.pop("step")
            other = step - sum(parts.values())
            cells = [block, layers, f"{token:.1f}", f"{engine:.1f}", f"{engine / token:.2f}",
                     f"{step:.1f}", *(f"{parts[k]:.1f}" for k in REGIONS), f"{other:.1f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
