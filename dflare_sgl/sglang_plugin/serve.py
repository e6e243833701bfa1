"""``dflare serve``: SGLang's server with ``--speculative-algorithm DFLARE``.

A thin wrapper: it resolves the target (a built-in alias or a local folder) and the draft,
adds the CPU environment when ``--device cpu`` (:func:`cpu_compat.engine_env`), and replaces
itself with ``python -m sglang.launch_server``; every other flag passes
through unchanged (``--`` before them is optional). The plain SGLang equivalent on a GPU is::

    python -m sglang.launch_server --model-path TARGET \\
        --speculative-algorithm DFLARE --speculative-draft-model-path DRAFT
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dflare_sgl.bundled import default_draft
from dflare_sgl.cli_helpers import add_target_argument
from dflare_sgl.sglang_plugin.cpu_compat import engine_env
from dflare_sgl.target import resolve_target


def launch_command(args: argparse.Namespace) -> list[str]:
    """The ``python -m sglang.launch_server`` argv for parsed ``dflare serve`` arguments."""
    extra = [a for a in args.passthrough if a != "--"]
    cmd = [sys.executable, "-m", "sglang.launch_server"]
    cmd += ["--model-path", str(resolve_target(args.target)), "--device", args.device]
    cmd += ["--host", args.host, "--port", str(args.port)]
    if not args.no_speculation:
        draft = args.draft or default_draft(args.target)
        if draft is None:
            raise ValueError(
                f"no --draft given and no draft ships for target {args.target!r}: pass --draft "
                "DIR (a QwenDFlareDraftModel or Qwen3DFlyModel checkpoint, e.g. from `dflare "
                "init-draft`), or --no-speculation to serve the target alone"
            )
        if not (Path(draft) / "config.json").is_file():
            raise ValueError(f"draft folder {draft!r} has no config.json: pass a draft checkpoint")
        cmd += ["--speculative-algorithm", "DFLARE", "--speculative-draft-model-path", str(draft)]
    return cmd + extra


def _serve(args: argparse.Namespace) -> None:
    cmd = launch_command(args)
    print("dflare: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, engine_env(args.device))


def add_parser(commands) -> None:
    """Add the ``serve`` verb to the ``dflare`` command's subparsers."""
    serve = commands.add_parser(
        "serve",
        allow_abbrev=False,  # never mistake an SGLang flag for an abbreviation of ours
        help="run SGLang's OpenAI-compatible server with DFLARE speculative decoding",
        description="Serve TARGET with SGLang (python -m sglang.launch_server) and "
        "--speculative-algorithm DFLARE. Any other flag goes to SGLang unchanged, e.g. "
        "`dflare serve --draft D --mem-fraction-static 0.5 --dtype float32`.",
    )
    add_target_argument(serve)
    serve.add_argument(
        "--draft",
        metavar="DIR",
        help="DFlare draft checkpoint folder (default: the bundled draft of a built-in target)",
    )
    serve.add_argument(
        "--no-speculation",
        action="store_true",
        help="serve the target alone (a baseline for comparisons)",
    )
    serve.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available, else cpu)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=30000, help="(default: %(default)s)")
    serve.set_defaults(run=_serve, passthrough=[])
