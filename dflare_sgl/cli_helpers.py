"""Helpers the command verbs share (``dflare generate``, ``demo``, ``gen-data``, ``train``,
``serve``, ``calibrate``): argument types, the target argument, prompt encoding, stop tokens
and streamed text. The verbs import these; nothing here imports a verb.
"""

from __future__ import annotations

import argparse
from typing import TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dflare_sgl.cost_model import CostModel, decoder_key
from dflare_sgl.engine import SpeculativeDecoder
from dflare_sgl.request import GenerationResult, verify_length_counts
from dflare_sgl.target import TARGET_ALIASES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    return name


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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


def encode_prompts(
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


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return eos_token_ids(model.generation_config, tokenizer)


def eos_token_ids(generation_config, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The token ids that end a response: the generation config's and the tokenizer's EOS."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


class TextStream:
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


def add_verify_length_arguments(p: argparse.ArgumentParser) -> None:
    """``--block-size`` and ``--cost-model``: how many tokens each step verifies."""
    p.add_argument(
        "--block-size",
        type=positive,
        metavar="N",
        help="fix the tokens verified per step (1 = plain decoding; default: chosen each step, "
        "up to the draft's block, from measured step costs and the running acceptance)",
    )
    p.add_argument(
        "--cost-model",
        metavar="FILE",
        help="step costs written by `dflare calibrate --out FILE` (default: this setting's "
        "cached calibration, measured on first use)",
    )


def speculative_decoder(
    target: PreTrainedModel, draft, args: argparse.Namespace
) -> SpeculativeDecoder:
    """The engine for ``target`` and ``draft`` as ``--block-size`` / ``--cost-model`` say;
    an adaptive one is calibrated (or reads its cached costs) before it returns."""
    if args.block_size is not None and args.cost_model:
        raise ValueError("--cost-model prices the adaptive verify length: drop it or --block-size")
    decoder = SpeculativeDecoder(target, draft, block_size=args.block_size)
    if decoder.adaptive:
        if args.cost_model:
            decoder.set_cost_model(CostModel.load(args.cost_model, decoder_key(decoder)))
        else:
            decoder.calibrate()
    return decoder


def verify_length_summary(results: list[GenerationResult]) -> str:
    """``n=1 40%, n=2 60%``: how often each verify length was chosen over the decode
    steps of ``results``."""
    counts = verify_length_counts(results)
    steps = max(sum(counts.values()), 1)
    return ", ".join(f"n={n} {c / steps:.0%}" for n, c in counts.items())
