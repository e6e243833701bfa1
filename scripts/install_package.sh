#!/usr/bin/env bash
# Build and install dflare_sgl (editable) with its C++ extension into the Python environment of
# the given interpreter. --no-build-isolation: the extension compiles against the torch already
# installed there, which pip leaves as it is. The one install command of both the README's
# set-up (scripts/setup_env.sh, into .venv) and the Dockerfile (into the SGLang image's Python).
#   bash scripts/install_package.sh [python]         (default: python3)
# Environment, read by setup.py:
#   TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA kernels (default: setup.py's
#                         DEFAULT_CUDA_ARCH_LIST without a GPU, the visible GPUs' with one)
#   MAX_JOBS              parallel compile jobs (default here: 2)
#   DFLARE_CUDA=0|1       CUDA kernels off / on, failing without nvcc (default: on if found)
#   DFLARE_BUILD_EXT=0    no extension at all (pure Python)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT"
