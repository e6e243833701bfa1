"""Check an installed dflare_sgl: its extension's kernels and, optionally, the SGLang plugin.

    python scripts/check_install.py [--cuda] [--sglang]

Prints one status line; exits 1, naming what is missing, unless the extension loaded with its
CPU kernels and, with ``--cuda``, its CUDA kernels compiled (checked from the dispatcher, so no
GPU is needed) and, with ``--sglang``, SGLang's plugin loader registers the DFLARE algorithm.
scripts/setup_env.sh prints the status, .ci/run and the Dockerfile insist on it.
"""

from __future__ import annotations

import argparse
import sys

import dflare_sgl  # noqa: F401  (registers torch.ops.dflare.* when the extension is built)
from dflare_sgl import _ext

OPS = ("verify_block", "layer_mix_kv")
CPU_ONLY_OPS = ("skinny_linear",)  # GPUs run the target's linears on cuBLAS


def sglang_registers_dflare() -> bool:
    """Whether SGLang, after loading its ``sglang.srt.plugins`` entry points, knows DFLARE."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    load_plugins()  # logs, rather than raises, a plugin that fails: from_string tells
    try:
        SpeculativeAlgorithm.from_string("DFLARE")
    except ValueError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="require the CUDA kernels")
    parser.add_argument("--sglang", action="store_true", help="require SGLang to know DFLARE")
    args = parser.parse_args()

    checks = {
        "extension loaded": _ext.extension_loaded(),
        "CPU kernels": all(_ext.has_kernel(op, "cpu") for op in OPS + CPU_ONLY_OPS),
        "CUDA kernels compiled": all(_ext.has_kernel(op, "cuda") for op in OPS),
    }
    required = ["extension loaded", "CPU kernels"] + ["CUDA kernels compiled"] * args.cuda
    if args.sglang:
        checks["SGLang registers DFLARE"] = sglang_registers_dflare()
        required.append("SGLang registers DFLARE")
    print("dflare_sgl: " + " | ".join(f"{name}: {ok}" for name, ok in checks.items()))
    missing = [name for name in required if not checks[name]]
    if missing:
        print(f"dflare_sgl: missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
