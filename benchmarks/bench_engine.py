"""End-to-end decoding speed: target-only greedy (HF ``generate``) vs speculative decoding.

Both run side by side in one process on the same prompts, target and dtype; each row is the
median of ``--repeats`` runs. Speedup = ours tokens/s over the target-only tokens/s. The
speculative output is checked to be token-identical to the target's greedy output.

    python benchmarks/bench_engine.py --target smollm2-135m --prompts mtbench --limit 8
    python benchmarks/bench_engine.py --draft PATH --device cuda --dtype bfloat16

Without ``--draft`` an untrained draft is used: tau ~ 1, so this measures the engine's
overhead per step rather than a speedup.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dflare_sgl.draft_model import DFlareDraftModel, DraftConfig
from dflare_sgl.engine import SamplingParams, SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.target import load_target


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m", help="offline alias or HF folder")
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: untrained)")
    ap.add_argument("--prompts", default="mtbench", choices=["mtbench", "humaneval"])
    ap.add_argument("--limit", type=int, default=8, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    model, tok = load_target(args.target, dtype=dtype, device=args.device)
    if args.draft:
        draft = DFlareDraftModel.from_pretrained(args.draft, dtype=dtype, device=args.device)
    else:
        torch.manual_seed(0)
        draft = DFlareDraftModel(DraftConfig.for_target(model.config, num_draft_layers=5))
        draft = draft.to(device=args.device, dtype=dtype)
    decoder = SpeculativeDecoder(model, draft, block_size=args.block_size)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in load_prompts(args.prompts, limit=args.limit)
    ]
    prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
    params = SamplingParams(args.max_new_tokens, stop_token_ids=(tok.eos_token_id,))

    def run_target() -> tuple[int, list[list[int]]]:
        outs = []
        for ids in prompts:
            inp = torch.tensor([ids], device=args.device)
            gen = model.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
            outs.append(gen[0, len(ids) :].tolist())
        return sum(map(len, outs)), outs

    def run_ours() -> tuple[int, list[list[int]], list]:
        outs, results = [], []
        for s in range(0, len(prompts), args.batch_size):
            res = decoder.generate(prompts[s : s + args.batch_size], params)
            results += res
            outs += [r.tokens for r in res]
        return sum(map(len, outs)), outs, results

    times = {"target-only": [], "dflare": []}
    for _ in range(args.repeats):
        _sync(args.device)
        t0 = time.perf_counter()
        n_ref, ref = run_target()
        _sync(args.device)
        t1 = time.perf_counter()
        n_ours, ours, results = run_ours()
        _sync(args.device)
        t2 = time.perf_counter()
        times["target-only"].append(n_ref / (t1 - t0))
        times["dflare"].append(n_ours / (t2 - t1))
        if ours != ref:
            raise SystemExit("speculative output differs from the target's greedy output")

    tau = statistics.mean(r.tau for r in results)
    base = statistics.median(times["target-only"])
    print(
        f"target={args.target} draft={args.draft or 'untrained'} device={args.device} "
        f"dtype={args.dtype} B={decoder.block_size} bs={args.batch_size} "
        f"prompts={len(prompts)} max_new={args.max_new_tokens} repeats={args.repeats}"
    )
    print(f"{'path':<12} {'tok/s (median)':>15} {'speedup':>8} {'tau':>6}")
    for name, tps in times.items():
        med = statistics.median(tps)
        t = f"{tau:6.2f}" if name == "dflare" else f"{'-':>6}"
        print(f"{name:<12} {med:15.1f} {med / base:8.2f} {t}")


if __name__ == "__main__":
    main()
