#!/usr/bin/env bash
# The README's transfer example, with nothing downloaded: a tiny ViT trained in full on digits 0-4
# (saved as timm weights, model.pth), then tuned on digits 5-9 from those weights with each method,
# by the VTAB protocol (grid rates per 256 images: 0.4, 1.6, 6.4 are 0.05, 0.2, 0.8 at batch 32) (grid on train/val, best retrained on train+val with 3 seeds, test top-1).
#   scripts/digits_transfer.sh [WORK_DIR]      (about 15 minutes on 2 CPU cores)
set -euo pipefail
WORK=${1:-digits-transfer}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
[ -d "$WORK/low" ] || $PY "$HERE/digits_to_folder.py" "$WORK/low" --classes 0-4
[ -d "$WORK/high" ] || $PY "$HERE/digits_to_folder.py" "$WORK/high" --classes 5-9
MODEL=(--model vit_tiny_patch16_224 --model-kwargs img_size=16 patch_size=4 embed_dim=64 depth=4 num_heads=4
       --crop-pct 1.0 --workers 0 --no-aug --cache-data)
$PY -m vapt_kernels.train --data-dir "$WORK/low" "${MODEL[@]}" --method full --epochs 40 --warmup-epochs 2 \
    --batch-size 32 --lr 0.05 --test-split test --output "$WORK/pretrain"
for method in linear vpt vapt; do
    extra=()
    [ "$method" = linear ] || extra=(--num-prompts 5)
    $PY -m vapt_kernels.train --data-dir "$WORK/high" "${MODEL[@]}" --pretrained-path "$WORK/pretrain/model.pth" \
        --method "$method" "${extra[@]}" --epochs 30 --warmup-epochs 2 --batch-size 32 \
        --lr-grid 0.4 1.6 6.4 --wd-grid 0 1e-4 --seeds 1 2 3 --test-split test --output "$WORK/$method"
done
$PY - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
print("| method | trainable parameters | best lr, wd (val) | test top-1 (3 seeds) |")
print("|---|---|---|---|")
for method in ("linear", "vpt", "vapt"):
    r = json.load(open(f"{work}/{method}/result.json"))
    params = json.load(open(f"{work}/{method}/final-seed1/result.json"))["parameters"]
    print(f"| {method} | {params['total']:,} ({params['percent']:.1f}% of the backbone) | "
          f"{r['best']['lr']:g}, {r['best']['weight_decay']:g} | {r['test_top1_mean']:.1f} +- {r['test_top1_std']:.1f} |")
PY
