"""Session fixtures shared by the test modules: the real offline SmolLM2-135M-Instruct target.

The GGUF -> HF conversion (~40 s) happens once per cache (``$DFLARE_CACHE`` or
``~/.cache/dflare_sgl``); later sessions reload the folder in under a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dflare_sgl.target import ensure_smollm2, load_target


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The HF folder of SmolLM2-135M-Instruct (bf16 weights, tokenizer, chat template)."""
    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_target(smollm2_dir):
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, eval mode, on CPU."""
    return load_target(str(smollm2_dir), dtype=torch.float32, device="cpu")


def pytest_terminal_summary(terminalreporter):
    """The CUDA kernel paths executed on the CPU emulation, and the bytes they read."""
    from cuda_emulator import REPORT

    if REPORT:
        terminalreporter.section("CUDA kernels run on the CPU emulation")
        for line in REPORT:
            terminalreporter.write_line(line)
