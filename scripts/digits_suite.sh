#!/usr/bin/env bash
# The README's suite example, with nothing downloaded: a tiny ViT trained in full on digits 0-4 (the
# "pretrained backbone", model.pth), then vapt-suite on a five-task benchmark written from the digits
# in the paper's layouts (scripts/digits_to_benchmark.py: four VTAB-1k-layout tasks, one FGVC-layout
# one), each task tuned by the protocol (grid on train800 -> val200, final runs with 2 seeds).
#   scripts/digits_suite.sh [WORK_DIR]      (about 10 minutes on 2 CPU cores)
set -euo pipefail
WORK=${1:-digits-suite}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
[ -d "$WORK/low" ] || $PY "$HERE/digits_to_folder.py" "$WORK/low" --classes 0-4
[ -d "$WORK/benchmark" ] || $PY "$HERE/digits_to_benchmark.py" "$WORK/benchmark"
MODEL=(--model vit_tiny_patch16_224 --model-kwargs img_size=16 patch_size=4 embed_dim=64 depth=4 num_heads=4
       --workers 0 --no-aug --cache-data)
[ -f "$WORK/pretrain/model.pth" ] || $PY -m vapt_kernels.train --data-dir "$WORK/low" "${MODEL[@]}" --crop-pct 1.0 \
    --method full --epochs 40 --warmup-epochs 2 --batch-size 32 --lr 0.05 --output "$WORK/pretrain" --overwrite
# Run again after an interruption: finished tasks are skipped, the interrupted one resumes.
$PY -m vapt_kernels.suite --tasks vtab/svhn vtab/eurosat vtab/clevr_count vtab/smallnorb_ele fgvc/dogs \
    --data-dir "$WORK/benchmark" "${MODEL[@]}" --pretrained-path "$WORK/pretrain/model.pth" \
    --method vapt --num-prompts 5 --epochs 20 --warmup-epochs 2 --batch-size 32 \
    --lr-grid 1.6 6.4 --wd-grid 0 --seeds 1 2 --output "$WORK/suite"
