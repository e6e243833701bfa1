"""How setup.py configures the extension build (without building it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit: setup.py builds CPU-only")
def test_cuda_arch_default_without_a_gpu_covers_newer_gpus():
    """With no GPU to detect architectures from, the kernels are compiled for Hopper and both
    Blackwells plus PTX, so a newer GPU JIT-compiles them instead of failing at first launch."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env.update(DFLARE_CUDA="1", CUDA_VISIBLE_DEVICES="")
    probe = (
        "import os, runpy, sys; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py'); print(os.environ['TORCH_CUDA_ARCH_LIST'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    ).stdout.split()  # fmt: skip
    assert out[-1] == "9.0;10.0;12.0+PTX", out
