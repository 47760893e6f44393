#!/usr/bin/env bash
# Small from-scratch models keep a large shared component in the CLS feature before the BNNeck (cosines ≈ 0.999),
# so the demo retrieves with the feature after it (--neck-feat after), as in Luo et al.'s BNNeck paper.
# The main job on embedded synthetic data: generate → prepare → ablate (ape, rpe, both: train → extract → evaluate)
# → extract → FAISS index → evaluate with ranked-list pictures → search the index with an image → export to ONNX → compare two variants. About 2.5 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:-demo}
REID=${REID:-.venv/bin/reid}
rm -rf "$OUT"

echo "== 1. synthetic pedestrians in the Market-1501 layout, prepared into HDF5"
$REID prepare synthetic --root "$OUT/synthetic" --out "$OUT/synthetic.h5" --seed 0 --ids 100 --image-size 128x64

echo "== 2. ablation: APE vs RPE vs both, tiny ViT trained on CPU"
TINY=(--preset vit_tiny --dim 128 --depth 4 --heads 4 --epochs 30 --batch 32 --optimizer adamw --lr 1e-3
      --weight-decay 0.05 --warmup-epochs 3 --drop-path 0 --neck-feat after)
$REID ablate --data "$OUT/synthetic.h5" --out "$OUT/ablation" --pe ape,rpe,both "${TINY[@]}"

echo "== 3. one run through the single commands: extract → index → evaluate"
RUN=$(ls -d "$OUT"/ablation/runs/ape__*)
$REID extract --run "$RUN" --data "$OUT/synthetic.h5" --out "$OUT/features.h5"
$REID index "$OUT/features.h5" --out "$OUT/gallery.faiss"
$REID evaluate "$OUT/features.h5" --index "$OUT/gallery.faiss" --out "$OUT/eval" --visualize 6

echo "== 3b. a new image searched in the saved index (here one of the query JPEGs, as a user would pass a crop)"
$REID search "$(ls "$OUT"/synthetic/query/*.jpg | head -1)" --index "$OUT/gallery.faiss" --top-k 5 --out "$OUT/search"

echo "== 3c. the run exported for serving: one ONNX file, checked in onnxruntime against the model"
$REID export --run "$RUN" --out "$OUT/deploy/ape.onnx"

echo "== 4. is 'both' really different from 'ape'? a paired bootstrap over the queries"
$REID evaluate "$(ls -d "$OUT"/ablation/runs/both__*)/features.h5" --out "$OUT/eval_both" >/dev/null
$REID compare "$OUT/eval" "$OUT/eval_both"
echo "== done: tables in $OUT/ablation/results.md, pictures in $OUT/ablation/pictures and $OUT/eval, ONNX in $OUT/deploy"
