"""The ``dflare`` command: speculative generation and draft checkpoint initialisation.

    dflare generate --target smollm2-135m --prompt "Explain speculative decoding."
    dflare generate --target /path/to/hf --draft /path/to/draft --prompts mtbench --limit 8
    dflare init-draft --target smollm2-135m --out /tmp/draft --layers 5 --fusion layerwise
    dflare gen-data ... / dflare train ...      (training verbs: dflare_sgl/training/cli.py)

Errors a user can cause (bad paths, broken or mismatched checkpoints, over-long prompts) end
the command with one ``dflare: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import torch
import transformers
from transformers import AutoConfig

from dflare_sgl import cost_model
from dflare_sgl.bundled import default_draft
from dflare_sgl.cli_helpers import (
    DTYPES,
    TextStream,
    add_target_argument,
    add_verify_length_arguments,
    device,
    encode_prompts,
    positive,
    speculative_decoder,
    stop_token_ids,
    verify_length_summary,
)
from dflare_sgl.draft_model import FUSION_ARCHITECTURE, DFlareDraftModel, DraftConfig
from dflare_sgl.engine import GenerationResult, SamplingParams, SpeculativeDecoder, pooled_tau
from dflare_sgl.prompts import PROMPT_SETS, load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import load_target, resolve_target

DRAFT_LAYERS = 5  # the DFlash default depth; DFlare goes to 7 once trained
BLOCK_SIZE = 16
log = logging.getLogger("dflare_sgl")


def _stats(results: list[GenerationResult]) -> str:
    steps = sum(len(r.accept_lengths) for r in results)
    drafted = sum(r.num_drafted for r in results)
    accepted = sum(r.num_accepted for r in results)
    rate = accepted / drafted if drafted else 0.0
    return (
        f"tau {pooled_tau(results):.2f} over {steps} steps | drafted {drafted}, accepted "
        f"{accepted} ({rate:.1%}) | verified {verify_length_summary(results)}"
    )


def _load_models(args: argparse.Namespace):
    """(target, tokenizer, draft) of ``--target`` / ``--draft`` / ``--dtype`` / ``--device``;
    without ``--draft``, the target's bundled draft or, with a warning, an untrained one."""
    dtype, dev = DTYPES[args.dtype], device(args.device)
    target, tokenizer = load_target(args.target, dtype=dtype, device=dev)
    draft_path = args.draft or default_draft(args.target)
    if draft_path:
        draft = DFlareDraftModel.from_pretrained(draft_path, dtype=dtype, device=dev)
    else:
        print(
            "dflare: warning: no --draft given and no draft ships for this target: using an "
            "untrained (random) draft, so tau stays ~1 until a trained draft is passed (the "
            "output is the target's either way)",
            file=sys.stderr,
        )
        config = DraftConfig.for_target(
            target.config, num_draft_layers=DRAFT_LAYERS, block_size=args.block_size or BLOCK_SIZE
        )
        draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(args.seed))
        draft = draft.to(device=dev, dtype=dtype)
    if torch.device(dev).type == "cpu":  # fast few-row linears: see skinny_linear.py
        use_skinny_linear(target, draft)
    return target, tokenizer, draft


def _generate(args: argparse.Namespace) -> None:
    if args.limit is not None and args.prompts is None:
        raise ValueError("--limit selects from a prompt set: use it with --prompts")
    texts = args.prompt or load_prompts(args.prompts, limit=args.limit)
    target, tokenizer, draft = _load_models(args)
    decoder = speculative_decoder(target, draft, args)
    prompts = encode_prompts(tokenizer, texts, chat=not args.no_chat_template)
    # The engine checks this too, but only when it reaches the batch: fail before any output.
    for i, ids in enumerate(prompts):
        needed = len(ids) + args.max_new_tokens + decoder.block_size
        if needed > decoder.max_positions:
            raise ValueError(
                f"prompt {i + 1} has {len(ids)} tokens; with --max-new-tokens "
                f"{args.max_new_tokens} and block size {decoder.block_size} it needs {needed} "
                f"positions, more than the {decoder.max_positions} the models support: shorten "
                "the prompt or lower --max-new-tokens"
            )
    stops = stop_token_ids(target, tokenizer)
    # Request i samples with seed + i: reproducible whatever the batch size.
    params = [
        SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + i,
            stop_token_ids=stops,
        )
        for i in range(len(prompts))
    ]

    results: list[GenerationResult] = []
    wall = 0.0
    for start in range(0, len(prompts), args.batch_size):
        batch = range(start, min(start + args.batch_size, len(prompts)))
        # A batch of one streams its text; a larger batch prints each text when it is done.
        stream = TextStream(tokenizer, sys.stdout) if len(batch) == 1 else None
        if stream:
            print(f"=== request {start + 1}/{len(prompts)} ===", flush=True)
        t0 = time.perf_counter()
        out = decoder.generate(
            [prompts[i] for i in batch], [params[i] for i in batch], on_commit=stream
        )
        wall += time.perf_counter() - t0
        for i, res in zip(batch, out, strict=True):
            if not stream:
                print(f"=== request {i + 1}/{len(prompts)} ===")
                print(tokenizer.decode(res.tokens, skip_special_tokens=True), end="")
            print(
                f"\n--- {len(res.tokens)} tokens ({res.finish_reason}), "
                f"{res.tokens_per_s:.1f} tok/s | {_stats([res])}"
            )
        results += out
    total = sum(len(r.tokens) for r in results)
    print(
        f"=== all {len(results)} request(s): {total} tokens in {wall:.2f} s = "
        f"{total / wall if wall > 0 else 0.0:.1f} tok/s | {_stats(results)} ==="
    )


def _calibrate(args: argparse.Namespace) -> None:
    target, _, draft = _load_models(args)
    decoder = SpeculativeDecoder(target, draft)
    model = decoder.calibrate(batch_sizes=args.batch_sizes, use_cache=not args.force)
    print(f"step cost relative to a plain one-token step ({model.key['device']}, "
          f"{model.key['dtype']}, {model.key['threads']} threads, {model.key['kernel']}):")
    print("    n " + "".join(f"{f'b={b}':>8}" for b in model.batch_sizes))
    for n in model.lengths:
        print(f"{n:>5} " + "".join(f"{model.relative(n, b):8.2f}" for b in model.batch_sizes))
    print(f"(plain step: {', '.join(f'{v:.1f}' for v in model.step_ms[0])} ms)")
    print(f"cached as {cost_model.cache_path(model.key)}")
    if args.out:
        print(f"written to {model.save(args.out)} (pass it back with --cost-model)")


def _init_draft(args: argparse.Namespace) -> None:
    target_config = AutoConfig.from_pretrained(resolve_target(args.target), local_files_only=True)
    config = DraftConfig.for_target(
        target_config,
        num_draft_layers=args.layers,
        fusion=args.fusion,
        block_size=args.block_size,
    )
    draft = DFlareDraftModel(config, generator=torch.Generator().manual_seed(args.seed))
    draft.to(DTYPES[args.dtype]).save_pretrained(args.out)
    print(
        f"wrote an untrained {FUSION_ARCHITECTURE[args.fusion]} to {args.out}: "
        f"{args.layers} layers, target layers {config.target_layer_ids}, "
        f"block size {args.block_size}, mask token {config.mask_token_id}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflare", description="DFlare / DFlash / DFly block-diffusion speculative decoding."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="generate with speculative decoding and report tau and speed",
        description="Decode prompts with block speculative decoding (output identical to the "
        "target's own decoding) and print each text, then tau (tokens committed per target "
        "forward), tokens/s and drafted/accepted counts per request and overall.",
    )
    add_target_argument(gen)
    gen.add_argument(
        "--draft",
        metavar="PATH",
        help="DFlare or DFlash draft checkpoint folder (default: the bundled draft for a "
        "built-in target, else an untrained draft)",
    )
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="prompt (repeatable)")
    src.add_argument(
        "--prompts", metavar="SET", help=f"a bundled prompt set: {', '.join(PROMPT_SETS)}"
    )
    gen.add_argument(
        "--limit", type=positive, metavar="N", help="use the first N prompts of --prompts"
    )
    gen.add_argument(
        "--max-new-tokens",
        type=positive,
        default=128,
        metavar="N",
        help="tokens to generate per request (default: 128)",
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)"
    )
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default: 1)")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed, request i uses seed + i; also seeds the untrained draft (default: 0)",
    )
    add_verify_length_arguments(gen)
    gen.add_argument(
        "--batch-size",
        type=positive,
        default=8,
        metavar="N",
        help="requests decoded together; a batch of one streams its text (default: 8)",
    )
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    gen.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:i] (default: cuda when available, else cpu)",
    )
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed prompts as raw text instead of a chat user turn",
    )
    gen.set_defaults(run=_generate)

    cal = commands.add_parser(
        "calibrate",
        help="measure the step costs that choose the verify length, and cache them",
        description="Time decode steps that verify n = 1 .. B tokens (B: the draft's block) "
        "at several batch sizes on this device, dtype and thread count, print their cost "
        "relative to a plain one-token step and cache them: the adaptive verify length of "
        "generate, demo and serve reads them (they calibrate on first use otherwise).",
    )
    add_target_argument(cal)
    cal.add_argument("--draft", metavar="PATH", help="draft folder (default: as generate)")
    cal.add_argument(
        "--batch-sizes",
        type=positive,
        nargs="+",
        metavar="B",
        help="batch sizes to time (default: 1, 2, 4, .. 16 on CPU, .. 64 on a GPU)",
    )
    cal.add_argument("--out", metavar="FILE", help="also write the cost model to FILE")
    cal.add_argument("--force", action="store_true", help="re-measure even if cached")
    cal.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    cal.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:i] (default: cuda when available, else cpu)",
    )
    cal.set_defaults(run=_calibrate, seed=0, block_size=None)

    init = commands.add_parser(
        "init-draft",
        help="write a randomly initialised draft checkpoint for a target",
        description="Write an untrained draft for TARGET in a published checkpoint format: "
        "DFlare (--fusion layerwise, AngelSlim QwenDFlareDraftModel), DFlash (--fusion "
        "shared, z-lab DFlashDraftModel) or DFly (--fusion dfly, AngelSpec Qwen3DFlyModel). "
        "A starting point for training, or for testing.",
    )
    add_target_argument(init)
    init.add_argument("--out", required=True, metavar="DIR", help="output folder")
    init.add_argument(
        "--layers",
        type=positive,
        default=DRAFT_LAYERS,
        metavar="N",
        help=f"draft layers (default: {DRAFT_LAYERS})",
    )
    init.add_argument(
        "--fusion",
        choices=sorted(FUSION_ARCHITECTURE),
        default="layerwise",
        help="layerwise = DFlare format, shared = DFlash format, dfly = DFly format "
        "(default: layerwise)",
    )
    init.add_argument(
        "--block-size",
        type=positive,
        default=BLOCK_SIZE,
        metavar="N",
        help=f"block size (default: {BLOCK_SIZE})",
    )
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    init.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="saved weight dtype (default: float32)"
    )
    init.set_defaults(run=_init_draft)
    from dflare_sgl.training.cli import add_parser as add_training  # imports this module

    add_training(commands)  # gen-data, train
    from dflare_sgl.sglang_plugin.serve import add_parser as add_serve

    add_serve(commands)  # serve
    from dflare_sgl.demo import add_parser as add_demo

    add_demo(commands)  # demo
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `dflare serve` hands the flags it does not know to SGLang; other verbs refuse them.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "passthrough"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passthrough = unknown
    if not log.handlers:  # the package's own progress notes, e.g. the one-time conversion
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dflare: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    # The command reports its own progress; transformers' load bars would bury it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        args.run(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        message = " ".join(str(e).splitlines())
        print(f"dflare: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
