#!/usr/bin/env bash
# The seed's open problem: the raw relative-position triplet loss against the stabilised one, same everything else.
# Writes runs under $OUT and docs/figures/rp_triplet_*.png (see docs/rp_triplet.md). About 6 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:-study}
EPOCHS=${EPOCHS:-60}
REID=${REID:-.venv/bin/reid}
PY=${PY:-.venv/bin/python}
[ -f "$OUT/synthetic.h5" ] || $REID prepare synthetic --root "$OUT/synthetic" --out "$OUT/synthetic.h5" --seed 0 \
  --ids 100 --image-size 128x64
COMMON=(--data "$OUT/synthetic.h5" --pe both --loss ce+triplet+rp-triplet --preset vit_tiny --dim 128 --depth 4
        --heads 4 --epochs "$EPOCHS" --batch 32 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 3
        --drop-path 0 --neck-feat after --eval-every 10 --top-n 8)
for form in raw stable; do
  if [ ! -f "$OUT/$form/model.safetensors" ]; then
    $REID train "${COMMON[@]}" --out "$OUT/$form" --rp-form "$form" $([ -f "$OUT/$form/checkpoint.pt" ] && echo --resume) \
      || echo "the $form run stopped (see above); its metrics up to the last good epoch are kept"
  fi
done
$PY -m reidcli.report.study "$OUT/raw" "$OUT/stable" docs/figures
