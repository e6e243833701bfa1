"""``dflare demo``: the main job. The offline SmolLM2 target decodes a few held-out prompts
(HumanEval and MT-Bench, never trained on) twice in one run, first alone (HF greedy
``generate``), then with the bundled DFlare draft, and ends with one line::

    tau X.XX | speedup X.XXx over target-only greedy | N/N outputs identical to target-only

Speedup is the ratio of the two runs' tokens per second; identical means token for token.

On CPU the engine runs the target's and draft's linears on ``torch.ops.dflare.skinny_linear``
(:mod:`dflare_sgl.skinny_linear`), which speeds up a 1-token decode as well. So that the line
does not pass that off as drafting, a third run decodes with the target alone on the same
kernel, and the line above the summary splits the speedup into the kernel's and drafting's.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from dflare_sgl import evaluation
from dflare_sgl.bundled import default_draft
from dflare_sgl.cli_helpers import (
    DTYPES,
    TextStream,
    add_target_argument,
    add_verify_length_arguments,
    encode_prompts,
    positive,
    speculative_decoder,
    stop_token_ids,
    verify_length_summary,
)
from dflare_sgl.cli_helpers import device as checked_device
from dflare_sgl.draft_model import DFlareDraftModel
from dflare_sgl.engine import pooled_tau
from dflare_sgl.prompts import load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target

DEMO_SETS = ("humaneval", "mtbench")


def _identical(a: evaluation.DecodeRun, b: evaluation.DecodeRun) -> int:
    return sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))


def summary_line(target_run: evaluation.DecodeRun, spec_run: evaluation.DecodeRun) -> str:
    """The demo's last line, from a target-only run and a speculative run on the same prompts."""
    tau = pooled_tau(spec_run.results)
    speedup = spec_run.tokens_per_s / target_run.tokens_per_s
    same = _identical(target_run, spec_run)
    n = len(spec_run.outputs)
    return (
        f"tau {tau:.2f} | speedup {speedup:.2f}x over target-only greedy | "
        f"{same}/{n} outputs identical to target-only"
    )


def _demo(args: argparse.Namespace) -> None:
    dtype, device = DTYPES[args.dtype], checked_device(args.device)
    draft_path = args.draft or default_draft(args.target)
    if draft_path is None:
        raise ValueError(
            f"no draft ships for target {args.target!r}: pass --draft with a trained draft"
        )
    texts = [t for name in DEMO_SETS for t in load_prompts(name, limit=args.prompts_per_set)]
    print(f"dflare demo: {args.target} + draft {draft_path} on {device} ({args.dtype})", flush=True)
    target, tokenizer = load_target(args.target, dtype=dtype, device=device)
    draft = DFlareDraftModel.from_pretrained(draft_path, dtype=dtype, device=device)
    prompts = encode_prompts(tokenizer, texts, chat=True)
    stops = stop_token_ids(target, tokenizer)
    # One short untimed pass before each timed run, so none pays for first-call set-up.
    evaluation.hf_greedy(target, prompts[:1], 4, stops)

    n, new = len(prompts), args.max_new_tokens
    with tqdm(total=n, unit="prompt", desc="target alone", file=sys.stdout) as bar:
        alone = evaluation.hf_greedy(target, prompts, new, stops, on_done=bar.update)
    skinny = None
    if torch.device(device).type == "cpu":
        use_skinny_linear(target, draft)
        evaluation.hf_greedy(target, prompts[:1], 4, stops)
        desc = "target alone, skinny_linear"
        with tqdm(total=n, unit="prompt", desc=desc, file=sys.stdout) as bar:
            skinny = evaluation.hf_greedy(target, prompts, new, stops, on_done=bar.update)
    # After the kernel switch: the step costs the verify length is chosen from depend on it.
    decoder = speculative_decoder(target, draft, args)
    evaluation.speculative(decoder, prompts[:1], 4, stops)
    verify = "adaptive" if decoder.adaptive else "fixed"
    print(
        f"--- prompt 1/{n}, decoded with DFlare (verify length {verify}, up to "
        f"{decoder.block_size}) ---",
        flush=True,
    )
    print(texts[0].strip(), "\n---", flush=True)
    stream = TextStream(tokenizer, sys.stdout)
    first = evaluation.speculative(
        decoder, prompts[:1], new, stops, on_commit=lambda _i, row, tokens: stream(row, tokens)
    )
    print("\n---", flush=True)
    with tqdm(total=n, initial=1, unit="prompt", desc="with DFlare", file=sys.stdout) as bar:
        rest = evaluation.speculative(decoder, prompts[1:], new, stops, on_done=bar.update)
    spec = first + rest
    print(
        f"target alone {alone.tokens_per_s:.1f} tok/s, with DFlare {spec.tokens_per_s:.1f} tok/s "
        f"({spec.num_tokens} tokens, {n} prompts, {torch.get_num_threads()} threads)"
    )
    print(f"tokens verified per step: {verify_length_summary(spec.results)}")
    if skinny is not None:
        print(
            f"of that: target alone on skinny_linear {skinny.tokens_per_s:.1f} tok/s "
            f"({skinny.tokens_per_s / alone.tokens_per_s:.2f}x, {_identical(alone, skinny)}/{n} "
            f"outputs identical), DFlare drafting on top "
            f"{spec.tokens_per_s / skinny.tokens_per_s:.2f}x"
        )
    print(summary_line(alone, spec), flush=True)


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the main job: target alone vs with the bundled DFlare draft, side by side",
        description="Decode a few held-out HumanEval and MT-Bench prompts greedily twice, "
        "target alone (HF generate) and with DFlare, and print tau, the speedup and how many "
        "outputs are token-identical. Offline: the built-in target and its bundled draft.",
    )
    add_target_argument(demo)
    demo.add_argument(
        "--draft", metavar="PATH", help="draft folder (default: the bundled draft of TARGET)"
    )
    demo.add_argument(
        "--prompts-per-set",
        type=positive,
        default=3,
        metavar="N",
        help=f"first N prompts of each of {', '.join(DEMO_SETS)} (default: 3)",
    )
    demo.add_argument(
        "--max-new-tokens", type=positive, default=128, metavar="N", help="(default: 128)"
    )
    add_verify_length_arguments(demo)
    demo.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    demo.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:i] (default: cuda when available, else cpu)",
    )
    demo.set_defaults(run=_demo)
