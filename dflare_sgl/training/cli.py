"""The training verbs of the ``dflare`` command::

dflare gen-data --target smollm2-135m --prompts sharegpt --limit 512 --out data/smollm2
dflare train --target smollm2-135m --data data/smollm2 --out drafts/smollm2 --steps 2000
dflare draft-vocab --data data/smollm2 --draft drafts/smollm2 --size 8192
torchrun --nproc-per-node 2 -m dflare_sgl.cli train ...     # FSDP2 across processes
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from dflare_sgl.cli_helpers import add_target_argument, device, nonnegative, positive
from dflare_sgl.draft_model import FUSION_ARCHITECTURE


def _config_kwargs(args: argparse.Namespace, config_type) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(config_type) if hasattr(args, f.name)}


def _gen_data(args: argparse.Namespace) -> None:
    from dflare_sgl.training.generate import GenDataConfig, generate_data

    args.device = device(args.device)
    out = generate_data(GenDataConfig(**_config_kwargs(args, GenDataConfig)))
    print(f"data in {out}")


def _train(args: argparse.Namespace) -> None:
    from dflare_sgl.training.trainer import TrainConfig, train

    args.device = device(args.device)
    args.gamma = args.gamma or args.gamma_schedule
    out = train(TrainConfig(**_config_kwargs(args, TrainConfig)))
    print(f"draft in {out}")


def _draft_vocab(args: argparse.Namespace) -> None:
    from dflare_sgl.draft_model import DFlareDraftModel
    from dflare_sgl.training.draft_vocab import most_frequent_tokens, response_token_counts

    draft = DFlareDraftModel.from_pretrained(args.draft)
    counts = response_token_counts(args.data, draft.config.vocab_size)
    ids = most_frequent_tokens(counts, args.size)
    draft.set_draft_vocab(ids)
    draft.save_pretrained(args.out or args.draft)
    covered = float(counts[ids].sum()) / float(counts.sum())
    print(
        f"draft vocabulary: {ids.numel()} of {draft.config.vocab_size} tokens, covering "
        f"{covered:.2%} of the response tokens in {args.data}; draft in {args.out or args.draft}"
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``gen-data``, ``train`` and ``draft-vocab`` to the ``dflare`` subcommands."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    gen = commands.add_parser(
        "gen-data",
        help="regenerate training data with the target (ShareGPT prompts)",
        description="Sample the target's own responses to ShareGPT first user turns (deduplicated, "
        "evaluation prompts excluded) into JSONL shards with token ids and a loss mask, or label "
        "whole conversations with one target prefill (--responses labelled). Re-running the same "
        "command resumes after the last complete shard.",
    )
    add_target_argument(gen)
    gen.add_argument(
        "--prompts",
        default="sharegpt",
        metavar="SOURCE",
        help='sharegpt (default), or a JSONL file of {"text", "id", "reply"} rows',
    )
    gen.add_argument(
        "--responses",
        choices=["target", "sharegpt", "labelled"],
        default="target",
        help="target: the target's own responses (default); sharegpt: the dataset's first "
        "replies, no generation (pretraining data for a later fine-tune on regenerated data); "
        "labelled: every assistant turn of the conversations, labelled by one batched target "
        "prefill with its greedy tokens and top-k log-probabilities (no generation)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=8,
        metavar="K",
        help="labelled: the target's K likeliest tokens kept per position as soft targets for "
        "train --kl-weight, 0 = greedy labels only (default: 8)",
    )
    gen.add_argument(
        "--max-len",
        type=positive,
        default=1024,
        metavar="N",
        help="labelled: conversations cut at N tokens (default: 1024)",
    )
    gen.add_argument(
        "--backend",
        default="hf",
        metavar="hf|sglang|URL",
        help="what regenerates (--responses target): hf = HF generate in this process "
        "(default); sglang = an SGLang server gen-data starts for the target (continuous "
        "batching); http://HOST:PORT = a running SGLang server of the same target",
    )
    gen.add_argument("--limit", type=positive, metavar="N", help="number of prompts (default all)")
    gen.add_argument("--max-new-tokens", type=positive, default=256, metavar="M")
    gen.add_argument("--max-prompt-tokens", type=positive, default=512, help="skip longer prompts")
    gen.add_argument(
        "--batch-size",
        type=positive,
        metavar="B",
        help="prompts per forward (default: 16; labelled text on a CPU: 1, where padding "
        "costs more than batching gains)",
    )
    gen.add_argument("--shard-size", type=positive, default=64, help="prompts per shard")
    gen.add_argument(
        "--temperature",
        type=nonnegative,
        default=0.7,
        metavar="T",
        help="0 = greedy (default: 0.7)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--device", default=default_device, help="cpu or cuda[:i]")
    gen.add_argument("--out", required=True, metavar="DIR")
    gen.set_defaults(run=_gen_data)

    tr = commands.add_parser(
        "train",
        help="train a DFlare / DFlash draft on gen-data output",
        description="Train a draft on regenerated data with the target's hidden states computed "
        "online. Writes the draft (published format) to --out, checkpoints to "
        "--out/checkpoints, metrics to --out/metrics.jsonl. Under torchrun the draft is "
        "FSDP2-sharded and the data split by rank.",
    )
    add_target_argument(tr)
    tr.add_argument("--data", required=True, metavar="DIR", help="a gen-data folder")
    tr.add_argument("--out", required=True, metavar="DIR")
    tr.add_argument(
        "--fusion",
        choices=sorted(FUSION_ARCHITECTURE),
        default="layerwise",
        help="layerwise = DFlare, shared = DFlash, dfly = DFly (shared + layer-wise residual "
        "fusion and the hidden-state correction head) (default: layerwise)",
    )
    tr.add_argument("--layers", type=positive, default=2, help="draft layers D (default: 2)")
    tr.add_argument(
        "--captured-layers",
        type=positive,
        metavar="T",
        help="target layers the draft reads (default: D)",
    )
    tr.add_argument("--block-size", type=positive, default=16)
    init = tr.add_mutually_exclusive_group()
    init.add_argument(
        "--init-from-target",
        action="store_true",
        help="start draft layer i as a copy of target layer L-D+i (and the target's final norm)",
    )
    init.add_argument(
        "--init-draft",
        metavar="DIR",
        help="start from a saved draft's weights (same shape), e.g. one pretrained on "
        "`gen-data --responses sharegpt` data; optimizer and schedule start afresh",
    )
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive, metavar="N")
    length.add_argument("--epochs", type=float, metavar="E", help="default: 1 epoch")
    tr.add_argument("--lr", type=float, default=6e-4)
    tr.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps")
    tr.add_argument("--weight-decay", type=nonnegative, default=0.01)
    tr.add_argument("--batch-size", type=positive, default=4, help="sequences per step and rank")
    tr.add_argument(
        "--anchors",
        type=positive,
        default=32,
        metavar="K",
        help="blocks per sequence (default: 32)",
    )
    gamma = tr.add_mutually_exclusive_group()
    gamma.add_argument("--gamma", metavar="G", help="positional weight decay (default: 7 at B=16)")
    gamma.add_argument(
        "--gamma-schedule", metavar="START:END", help="progressive gamma, e.g. 4.5:10.5"
    )
    gamma.add_argument(
        "--no-position-weighting",
        dest="position_weighting",
        action="store_false",
        help="plain CE instead of the positional weighting",
    )
    tr.add_argument(
        "--focal-weight",
        type=nonnegative,
        default=0.3,
        help="first-error focal loss weight, 0 = off (default: 0.3)",
    )
    tr.add_argument(
        "--chain-weight",
        type=nonnegative,
        default=0.1,
        help="chain loss weight, 0 = off (default: 0.1)",
    )
    tr.add_argument(
        "--kl-weight",
        type=nonnegative,
        default=0.0,
        help="KL to the target's top-k soft targets (data from gen-data --responses labelled), "
        "0 = off (default: 0)",
    )
    tr.add_argument(
        "--draft-vocab-size",
        type=positive,
        metavar="N",
        help="train over the N most frequent response tokens of --data only, as the draft will "
        "propose (saved with it, like `dflare draft-vocab`): the token head's forward and "
        "backward cost N/V of the full vocabulary's (default: every token)",
    )
    tr.add_argument("--max-seq-len", type=positive, default=2048)
    tr.add_argument(
        "--cache-target-hidden",
        action="store_true",
        help="keep the target's hidden states of each sequence in host memory after its first "
        "epoch instead of recomputing them (about 2x faster epochs on CPU; T*H*2 bytes/token)",
    )
    tr.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto = bf16 autocast where the device has it (default: auto)",
    )
    tr.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    tr.add_argument(
        "--stop-after-steps",
        type=positive,
        metavar="N",
        help="stop this run after N steps (checkpointed; continue with --resume)",
    )
    tr.add_argument("--save-every", type=positive, default=200, metavar="N")
    tr.add_argument("--keep-checkpoints", type=positive, default=2)
    tr.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="K",
        help="real tau on held-out sequences every K steps, 0 = off (default: 0)",
    )
    tr.add_argument("--eval-prompts", type=positive, default=4)
    tr.add_argument("--eval-max-new-tokens", type=positive, default=48)
    tr.add_argument("--device", default=default_device, help="cpu or cuda (default: cuda if any)")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(run=_train)

    dv = commands.add_parser(
        "draft-vocab",
        help="restrict a draft's proposals to the target's most frequent response tokens",
        description="Count the response tokens of a gen-data folder and store the --size most "
        "frequent in the draft (draft_vocab_ids; config.json draft_vocab_size). Its token head "
        "then covers only those, which cuts a fixed cost of every CPU decoding step; outputs "
        "stay the target's.",
    )
    dv.add_argument("--data", required=True, metavar="DIR", help="a gen-data folder")
    dv.add_argument("--draft", required=True, metavar="DIR", help="the draft folder to update")
    dv.add_argument("--size", type=positive, default=8192, metavar="N", help="default: 8192")
    dv.add_argument("--out", metavar="DIR", help="write here instead of updating --draft")
    dv.set_defaults(run=_draft_vocab)
