"""Acceptance and wall-clock speed of a trained draft, side by side in one run on the same
prompts: the target's own greedy decoding (HF ``generate``), HF prompt-lookup decoding
(``prompt_lookup_num_tokens``, batch size 1 only) and DFlare speculative decoding.

Per prompt set (HumanEval, MT-Bench first turns, AIME): tau (mean and histogram), acceptance
rate by block position, and speedups at each batch size (tokens/s over HF greedy's at the same
batch size; median of ``--repeats`` runs, the methods interleaved in every repeat). Outputs
at batch size 1 are checked token for token against HF greedy. Writes ``accuracy.md`` (the
table) and PNG plots into ``--out``: tau histograms, acceptance by position, and the draft's
learned layer-fusion weights as a D x T heat map.

On CPU the engine runs its linears on ``torch.ops.dflare.skinny_linear``, which speeds up
the target's own 1-token decoding too. So every speedup is over stock HF greedy (torch's
``nn.Linear``), and a second copy of the target on skinny_linear runs HF greedy and prompt
lookup as well: the "DFlare / HF on skinny" column is what drafting alone adds.

    OMP_NUM_THREADS=2 python benchmarks/bench_accuracy.py --threads 2 --limit 10
    python benchmarks/bench_accuracy.py --draft PATH --sets humaneval mtbench --batch-sizes 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from datetime import date
from pathlib import Path

import torch

from dflare_sgl import evaluation
from dflare_sgl.bundled import bundled_draft
from dflare_sgl.cli_helpers import encode_prompts, stop_token_ids
from dflare_sgl.draft_model import DFlareDraftModel
from dflare_sgl.engine import SpeculativeDecoder
from dflare_sgl.prompts import load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target


def _plots(out: Path, acc: dict, draft: DFlareDraftModel, block_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(acc)
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        a = acc[s]
        ax.bar(range(1, block_size + 1), [h / max(a.steps, 1) for h in a.histogram])
        ax.set(title=f"{s}: tau {a.tau:.2f}", xlabel="tokens committed per step", ylabel="share")
    fig.tight_layout()
    fig.savefig(out / "tau_histograms.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for s in sets:
        ax.plot(range(1, block_size), acc[s].rate_by_position, marker="o", label=s)
    ax.set(xlabel="draft position in block", ylabel="accepted share of steps", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance_by_position.png", dpi=120)

    if draft.config.fusion == "layerwise":
        mix = draft.layer_fusion_weights.detach().float().softmax(-1).cpu()
        d, t = mix.shape
        fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * t), max(2.5, 1.3 + 0.6 * d)))
        im = ax.imshow(mix, cmap="viridis", vmin=0, vmax=1)
        for i in range(d):
            for j in range(t):
                w = float(mix[i, j])
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", color="w" if w < 0.6 else "k")
        ax.set_xticks(range(t), [str(i) for i in draft.config.target_layer_ids])
        ax.set_yticks(range(d), [f"draft layer {i}" for i in range(d)])
        ax.set(xlabel="target layer", title="learned layer-fusion weights")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "fusion_weights.png", dpi=120)
    plt.close("all")


def _training_curve(out: Path, metrics_file: Path) -> str:
    """Plot held-out tau (``eval_tau``) and the training batches' estimated tau against the
    sequences seen, from a ``dflare train`` metrics.jsonl; return the eval points as a table."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.open()]
    args = json.loads((metrics_file.parent / "train_args.json").read_text())
    seen = [r["step"] * args["batch_size"] for r in rows]
    evals = [(r["step"] * args["batch_size"], r["eval_tau"]) for r in rows if "eval_tau" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(seen, [r["tau_est"] for r in rows], lw=0.6, alpha=0.6, label="training batch (est.)")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="held-out ShareGPT (real tau)")
    ax.set(xlabel="training sequences seen", ylabel="tau")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=120)
    plt.close(fig)
    return "\n| sequences seen | held-out tau |\n|---:|---:|\n" + "".join(
        f"| {n} | {t:.2f} |\n" for n, t in evals
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder (default: the bundled draft)")
    ap.add_argument("--sets", nargs="+", default=["humaneval", "mtbench", "aime24"])
    ap.add_argument("--limit", type=int, default=10, help="first N prompts of each set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompt-lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--block-size", type=int, help="tokens verified per step (default: the engine's)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/out/accuracy", help="table and plots folder")
    ap.add_argument("--train-metrics", help="a metrics.jsonl of `dflare train` to plot")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dtype = getattr(torch, args.dtype)
    target, tok = load_target(args.target, dtype=dtype, device=args.device)
    # The engine's copy of the target: on CPU its linears run on skinny_linear.
    draft_path = args.draft or bundled_draft(args.target)
    draft = DFlareDraftModel.from_pretrained(draft_path, dtype=dtype, device=args.device)
    fast = target
    if torch.device(args.device).type == "cpu":
        fast = load_target(args.target, dtype=dtype, device=args.device)[0]
        use_skinny_linear(fast, draft)
    decoder = SpeculativeDecoder(fast, draft, block_size=args.block_size)
    B = decoder.block_size
    stops = stop_token_ids(target, tok)
    new = args.max_new_tokens
    warm = encode_prompts(tok, ["Hi!"], chat=True)
    for model in dict.fromkeys((target, fast)):  # each model once
        evaluation.hf_greedy(model, warm, 4, stops, prompt_lookup_tokens=args.prompt_lookup)
    evaluation.speculative(decoder, warm, 4, stops)

    def hf_runs(prompts: list[list[int]], bs: int) -> dict[str, evaluation.DecodeRun]:
        runs = {"hf": evaluation.hf_greedy(target, prompts, new, stops, batch_size=bs)}
        if fast is not target:
            runs["hf_skinny"] = evaluation.hf_greedy(fast, prompts, new, stops, batch_size=bs)
        if bs == 1:
            runs["pld"] = evaluation.hf_greedy(
                fast, prompts, new, stops, prompt_lookup_tokens=args.prompt_lookup
            )
        return runs

    acc, rows = {}, []
    for s in args.sets:
        prompts = encode_prompts(tok, load_prompts(s, limit=args.limit), chat=True)
        for bs in args.batch_sizes:
            speeds: dict[str, list[float]] = {}
            for r in range(args.repeats):
                runs = hf_runs(prompts, bs)
                runs["dflare"] = spec = evaluation.speculative(
                    decoder, prompts, new, stops, batch_size=bs
                )
                for name, run in runs.items():
                    speeds.setdefault(name, []).append(run.tokens_per_s)
                if r == 0:
                    pairs = zip(runs["hf"].outputs, spec.outputs, strict=True)
                    same = sum(a == b for a, b in pairs)
                    if bs == 1:
                        acc[s] = evaluation.acceptance(spec.results, B)
            med = {name: statistics.median(v) for name, v in speeds.items()}
            base = med["hf"]
            rows.append(
                (
                    s,
                    bs,
                    acc[s].tau if bs == 1 else None,
                    base,
                    *(med[k] / base if k in med else None for k in ("hf_skinny", "pld", "dflare")),
                    med["dflare"] / med.get("hf_skinny", base),
                    f"{same}/{len(prompts)}",
                )
            )
            print(rows[-1], flush=True)

    header = (
        f"{date.today()} | {_cpu_name()} ({os.cpu_count()} cores) | device {args.device} "
        f"{args.dtype} | {torch.get_num_threads()} threads | draft {draft_path} (B={B}, "
        f"{draft.config.num_hidden_layers} layers) | first {args.limit} prompts per set, "
        f"{new} new tokens, greedy | speedups over HF greedy with torch's nn.Linear, median of "
        f"{args.repeats} repeats; prompt lookup and DFlare on skinny_linear where shown\n\n"
        "| set | bs | tau | HF greedy tok/s | HF on skinny_linear | prompt lookup | DFlare "
        "| DFlare / HF on skinny | identical to HF |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def x(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}x"

    table = header + "".join(
        f"| {s} | {bs} | {'' if tau is None else f'{tau:.2f}'} | {base:.1f} | {x(hs)} | "
        f"{x(p)} | {x(d)} | {x(dd)} | {same} |\n"
        for s, bs, tau, base, hs, p, d, dd, same in rows
    )
    hist = "\n| set | steps | " + " | ".join(f"{k} tok" for k in range(1, B + 1)) + " |\n"
    hist += "|---|---:|" + "---:|" * B + "\n"
    for s, a in acc.items():
        shares = " | ".join(f"{h / max(a.steps, 1):.2f}" for h in a.histogram)
        hist += f"| {s} | {a.steps} | {shares} |\n"
    if args.train_metrics:
        hist += _training_curve(out, Path(args.train_metrics))
    (out / "accuracy.md").write_text(table + hist)
    print("\n" + table + hist)
    _plots(out, acc, draft, B)
    print(f"plots and table in {out}")


if __name__ == "__main__":
    main()
