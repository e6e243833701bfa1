"""Ablations at equal data, steps and seed: DFlare (layer-wise fusion) vs DFlash (shared fusion)
vs DFly (shared + layer-wise residual fusion, correction head), and the alignment terms added
one at a time (plain CE, + positional weighting, + first-error focal, + chain). Each variant is
trained with ``dflare train``'s trainer on the same data folder, then its real tau (greedy
speculative decoding at the fixed block, fp32) is measured on held-out HumanEval and MT-Bench
first turns, with its tokens/s over the target alone's (HF greedy, run just before it on the
same prompts and batch). Prints a markdown table with deltas.

    OMP_NUM_THREADS=1 python benchmarks/bench_ablations.py --data DATA --out /tmp/ablations \\
        --steps 80 --layers 1 --block-size 8

A variant whose folder already holds a trained draft with the same settings is not retrained,
so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dflare_sgl import evaluation
from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.draft_model import DFlareDraftModel
from dflare_sgl.engine import SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.target import load_target
from dflare_sgl.training.trainer import TrainConfig, train

# name -> TrainConfig fields that differ from the full DFlare objective
VARIANTS: dict[str, dict] = {
    "DFlare, CE": {"position_weighting": False, "focal_weight": 0.0, "chain_weight": 0.0},
    "DFlare, CE + pos": {"focal_weight": 0.0, "chain_weight": 0.0},
    "DFlare, CE + pos + focal": {"chain_weight": 0.0},
    "DFlare, CE + pos + focal + chain": {},
    "DFlash, CE + pos + focal + chain": {"fusion": "shared"},
    "DFly, CE + pos + focal + chain": {"fusion": "dfly"},
}
SETS = ("humaneval", "mtbench")


def _folder(name: str) -> str:
    return name.lower().replace(", ", "-").replace(" + ", "+").replace(" ", "")


def train_variant(base: TrainConfig, name: str, root: Path) -> Path:
    cfg = TrainConfig(**{**asdict(base), **VARIANTS[name], "out": str(root / _folder(name))})
    out = Path(cfg.out)
    args_file = out / "train_args.json"
    done = (out / "model.safetensors").is_file() and args_file.is_file()
    if done and json.loads(args_file.read_text()) == json.loads(json.dumps(asdict(cfg))):
        print(f"[{name}] already trained in {out}", flush=True)
        return out
    t0 = time.perf_counter()
    train(cfg)
    print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="a `dflare gen-data` folder")
    ap.add_argument("--out", required=True, help="one sub-folder per variant")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=8, help="first N prompts of each set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    base = TrainConfig(
        target=args.target,
        data=args.data,
        out="",
        layers=args.layers,
        block_size=args.block_size,
        steps=args.steps,
        batch_size=args.batch_size,
        anchors=args.anchors,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        save_every=args.steps,
        keep_checkpoints=1,
        cache_target_hidden=True,
    )
    root = Path(args.out)
    folders = {name: train_variant(base, name, root) for name in args.variants}

    target, tok = load_target(args.target, dtype=torch.float32, device="cpu")
    stops = stop_token_ids(target, tok)
    prompts = {
        s: encode_prompts(tok, load_prompts(s, limit=args.eval_prompts), chat=True) for s in SETS
    }
    taus: dict[str, dict[str, float]] = {}
    speed: dict[str, float] = {}  # tokens/s over the target alone's, both sets together
    for name, folder in folders.items():
        draft = DFlareDraftModel.from_pretrained(folder, dtype=torch.float32)
        decoder = SpeculativeDecoder(target, draft, block_size=draft.block_size)
        taus[name] = {}
        plain_s = spec_s = 0.0
        for s in SETS:
            n = len(prompts[s])
            plain = evaluation.hf_greedy(target, prompts[s], args.max_new_tokens, stops, n)
            run = evaluation.speculative(decoder, prompts[s], args.max_new_tokens, stops, n)
            if run.outputs != plain.outputs:
                raise AssertionError(f"[{name}] {s}: speculative output differs from greedy")
            plain_s += plain.wall_s / plain.num_tokens
            spec_s += run.wall_s / run.num_tokens
            taus[name][s] = evaluation.acceptance(run.results, decoder.block_size).tau
        speed[name] = plain_s / spec_s
        print(f"[{name}] tau {taus[name]}, {speed[name]:.2f}x the target alone", flush=True)

    print(
        f"\nsteps={args.steps} batch={args.batch_size} anchors={args.anchors} layers={args.layers} "
        f"block={args.block_size} lr={args.lr} seed={args.seed} data={args.data}; "
        f"tau = greedy fp32, first {args.eval_prompts} prompts per set, "
        f"{args.max_new_tokens} new tokens; delta vs the row above; speed: tokens/s over HF "
        f"greedy's on the same prompts, {torch.get_num_threads()} threads\n"
    )
    print("| variant | " + " | ".join(f"tau {s}" for s in SETS) + " | mean | delta | speed |")
    print("|---|" + "---:|" * (len(SETS) + 3))
    previous = None
    for name, row in taus.items():
        mean = statistics.mean(row.values())
        delta = "" if previous is None else f"{mean - previous:+.3f}"
        cells = " | ".join(f"{row[s]:.3f}" for s in SETS)
        print(f"| {name} | {cells} | {mean:.3f} | {delta} | {speed[name]:.2f}x |")
        previous = mean


if __name__ == "__main__":
    main()
