"""Builds and loads the test-only CPU emulation of the CUDA execution model
(``cuda_emulation/``): csrc's ``*_cuda.cu`` kernels, host code included, running on CPU tensors.

The build compiles the kernels with g++ and ``-fsanitize=kernel-address`` in outline mode: no
sanitizer runtime, every load and store calls the emulator's hooks, which count global-memory
bytes and check shared-memory use (see ``cuda_emulation.h`` for the model and its limits).
It takes ~1-2 minutes the first time and is cached by torch's extension builder afterwards.
"""

from __future__ import annotations

import functools
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "cuda_emulation"
CSRC = HERE.parent / "csrc"

# One line per kernel path the tests ran on the emulation (and the bytes it counted), printed
# at the end of the pytest run by conftest.py.
REPORT: list[str] = []


@functools.cache
def load():
    """The emulation module (``configure``, ``launches``, ``verify_block``, ``layer_mix_kv``)."""
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(
        name="dflare_cuda_emulation",
        sources=[
            str(SOURCES / "harness.cpp"),
            # The host code's shared argument checks and projection step.
            str(CSRC / "layer_mix_kv.cpp"),
            str(CSRC / "verify_block.cpp"),
        ],
        extra_include_paths=[str(SOURCES / "shim"), str(SOURCES), str(CSRC)],
        extra_cflags=[
            "-O2",
            "-std=c++20",
            "-fopenmp",
            "-DDFLARE_WITH_CUDA",
            "-Ddflare=dflare_emulated",
            "-Wno-unknown-pragmas",
            "-fsanitize=kernel-address",
            "--param=asan-instrumentation-with-call-threshold=0",
            "--param=asan-stack=0",
            "--param=asan-globals=0",
            "-fno-sanitize-address-use-after-scope",
        ],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
