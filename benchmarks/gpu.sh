#!/usr/bin/env bash
# One call on a GPU machine (H100/H200), under 8 minutes: the peer baseline, then every reidcli target, side by side.
# Runs from the source tree (PYTHONPATH=.), needs only torch, timm, h5py, numpy (no FAISS: the GPU retrieval path is
# torch). Prints one table last; JSON goes to $OUT (gpu_bench.json, anchor_gpu.json) for benchmarks/results/, with
# kernel profiles (profile_*.txt). One H200 run took 240 s (peer ~80 s, ours ~180 s).
#   device run:  bash benchmarks/gpu.sh        (carry .bench_peer holding a copy of shared/bench/peer_baseline.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results/gpu} PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"
PEER=.bench_peer/peer_baseline.py
[ -f "$PEER" ] || PEER=../shared/bench/peer_baseline.py
if [ -z "${SKIP_PEER:-}" ]; then  # SKIP_PEER=1: a second call on the same card, the peer already measured
  echo "== peer baseline ($PEER)"
  timeout ${PEER_TIMEOUT:-150} python3 "$PEER" 2>&1 | tail -n 20 || echo "peer baseline failed or timed out"
fi
echo "== the last block for the CLS token alone against the whole block (interleaved A/B)"
timeout ${LAST_BLOCK_TIMEOUT:-60} python3 -m benchmarks.last_block --rounds 5 --out "$OUT/last_block_gpu.json" \
  || echo "last-block A/B failed or timed out"
echo "== reidcli"
timeout ${OURS_TIMEOUT:-300} python3 -m benchmarks.gpu_bench --peer "$OUT/anchor_gpu.json" --out "$OUT" ${GPU_BENCH_ARGS:-}
