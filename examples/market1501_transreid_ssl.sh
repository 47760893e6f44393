#!/usr/bin/env bash
# Market-1501 recipe mirroring TransReID-SSL: ViT-B/16 initialised from the LUPerson self-supervised weights,
# 256×128, batch 64 (16 ids × 4), SGD lr 0.008 momentum 0.9, weight decay 1e-4, cosine over 120 epochs with
# 5 warm-up epochs, drop-path 0.1, flip + pad 10 + random crop + random erasing 0.5, mean = std = 0.5.
# Needs: the extracted Market-1501 folder (or its zip) and the LUPerson ViT-B/16 weights as a local file
# (TransReID-SSL's vit_base_ics_cfs_lup.pth). Run from the repository root after `make install`.
set -euo pipefail
MARKET=${MARKET:-$HOME/data/Market-1501-v15.09.15}
INIT=${INIT:-$HOME/weights/vit_base_ics_cfs_lup.pth}
OUT=${OUT:-runs/market}
REID=${REID:-.venv/bin/reid}

$REID prepare market1501 --root "$MARKET" --out data/market1501.h5 --image-size 256x128

# the three positional encodings, same recipe (add --seeds 0,1,2 for mean ± std)
$REID ablate --data data/market1501.h5 --out "$OUT/ablation" --pe ape,rpe,both \
  --preset vit_base --patch-size 16 --init "$INIT" --epochs 120 --batch 64 --k 4 --optimizer sgd --lr 0.008 \
  --weight-decay 1e-4 --warmup-epochs 5 --drop-path 0.1

# or a single run with the seed's relative-position triplet loss, then retrieval with re-ranking
$REID train --data data/market1501.h5 --out "$OUT/both-rp" --pe both --loss ce+triplet+rp-triplet \
  --preset vit_base --init "$INIT" --epochs 120 --batch 64 --lr 0.008 --eval-every 10
$REID plot "$OUT/both-rp"   # curves, APE grid, RPE maps, the RP loss's patches → $OUT/both-rp/pictures/
$REID extract --run "$OUT/both-rp" --data data/market1501.h5 --out "$OUT/both-rp/features.h5"
$REID index "$OUT/both-rp/features.h5" --out "$OUT/both-rp/gallery.faiss"
$REID evaluate "$OUT/both-rp/features.h5" --index "$OUT/both-rp/gallery.faiss"
$REID evaluate "$OUT/both-rp/features.h5" --rerank --out "$OUT/both-rp/eval" --visualize 8
$REID evaluate "$OUT/both-rp/features.h5" --aqe --rerank --out "$OUT/both-rp/eval_aqe"   # fast-reid's AQE first
$REID compare "$OUT/both-rp/eval" "$OUT/both-rp/eval_aqe"
