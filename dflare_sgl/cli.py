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
from typing import TextIO

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from dflare_sgl.bundled import default_draft
from dflare_sgl.draft_model import FUSION_ARCHITECTURE, DFlareDraftModel, DraftConfig
from dflare_sgl.engine import GenerationResult, SamplingParams, SpeculativeDecoder, pooled_tau
from dflare_sgl.prompts import PROMPT_SETS, load_prompts
from dflare_sgl.skinny_linear import use_skinny_linear
from dflare_sgl.target import TARGET_ALIASES, load_target, resolve_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DRAFT_LAYERS = 5  # the DFlash default depth; DFlare goes to 7 once trained
BLOCK_SIZE = 16
log = logging.getLogger("dflare_sgl")


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    return name


class _TextStream:
    """Writes one request's text as its tokens are committed.

    Decodes the whole sequence each time and prints the new suffix, holding it back while it
    ends inside a multi-byte character (shown as U+FFFD until the rest arrives).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, request: int, new_tokens: list[int]) -> None:
        self.tokens += new_tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def _encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], chat: bool
) -> list[list[int]]:
    if not chat:
        return [tokenizer.encode(t) for t in texts]
    if not tokenizer.chat_template:
        raise ValueError(
            "the target's tokenizer has no chat template; pass --no-chat-template to feed the "
            "prompts as raw text"
        )
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,  # the template already has them
        )
        for t in texts
    ]


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def _stats(results: list[GenerationResult]) -> str:
    steps = sum(len(r.accept_lengths) for r in results)
    drafted = sum(r.num_drafted for r in results)
    accepted = sum(r.num_accepted for r in results)
    rate = accepted / drafted if drafted else 0.0
    return (
        f"tau {pooled_tau(results):.2f} over {steps} steps | drafted {drafted}, accepted "
        f"{accepted} ({rate:.1%})"
    )


def _generate(args: argparse.Namespace) -> None:
    if args.limit is not None and args.prompts is None:
        raise ValueError("--limit selects from a prompt set: use it with --prompts")
    dtype, device = DTYPES[args.dtype], _device(args.device)
    texts = args.prompt or load_prompts(args.prompts, limit=args.limit)
    target, tokenizer = load_target(args.target, dtype=dtype, device=device)
    draft_path = args.draft or default_draft(args.target)
    if draft_path:
        draft = DFlareDraftModel.from_pretrained(draft_path, dtype=dtype, device=device)
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
        draft = draft.to(device=device, dtype=dtype)
    if torch.device(device).type == "cpu":  # fast few-row linears: see skinny_linear.py
        use_skinny_linear(target, draft)
    decoder = SpeculativeDecoder(target, draft, block_size=args.block_size)
    prompts = _encode_prompts(tokenizer, texts, chat=not args.no_chat_template)
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
    stops = _stop_token_ids(target, tokenizer)
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
        stream = _TextStream(tokenizer, sys.stdout) if len(batch) == 1 else None
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_target_argument(p: argparse.ArgumentParser) -> None:
    """``--target``, as every verb that loads a target takes it."""
    p.add_argument(
        "--target",
        default="smollm2-135m",
        metavar="TARGET",
        help=f"built-in offline target ({', '.join(TARGET_ALIASES)}) or a local HF model "
        "folder (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflare", description="DFlare / DFlash block-diffusion speculative decoding."
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
        "--limit", type=_positive, metavar="N", help="use the first N prompts of --prompts"
    )
    gen.add_argument(
        "--max-new-tokens",
        type=_positive,
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
    gen.add_argument(
        "--block-size",
        type=_positive,
        metavar="N",
        help="tokens per verify step (default: the draft's block size, at most 2 on CPU)",
    )
    gen.add_argument(
        "--batch-size",
        type=_positive,
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

    init = commands.add_parser(
        "init-draft",
        help="write a randomly initialised draft checkpoint for a target",
        description="Write an untrained draft for TARGET in a published checkpoint format: "
        "DFlare (--fusion layerwise, AngelSlim QwenDFlareDraftModel) or DFlash (--fusion "
        "shared, z-lab DFlashDraftModel). A starting point for training, or for testing.",
    )
    add_target_argument(init)
    init.add_argument("--out", required=True, metavar="DIR", help="output folder")
    init.add_argument(
        "--layers",
        type=_positive,
        default=DRAFT_LAYERS,
        metavar="N",
        help=f"draft layers (default: {DRAFT_LAYERS})",
    )
    init.add_argument(
        "--fusion",
        choices=sorted(FUSION_ARCHITECTURE),
        default="layerwise",
        help="layerwise = DFlare format, shared = DFlash format (default: layerwise)",
    )
    init.add_argument(
        "--block-size",
        type=_positive,
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
