"""CPU evaluation benchmark: Market-1501 and MSMT17 sizes, ours beside torchreid's Cython evaluator.

    python benchmarks/cpu_eval.py [--peer-dir DIR] [--msmt] [--big] [--out benchmarks/results/cpu_eval.json]

``--peer-dir`` names a folder holding a built ``rank_cy`` extension (torchreid's ``eval_market1501_cy``), built in
a separate environment; it is never part of this repository. Without it only our own numbers are measured.
Features are random with Market-like structure (ids seen by several cameras, distractors), d = 768, at two
qualities: like a trained model (mAP ≈ 0.89) and weak (mAP ≈ 0.32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.features import FeatureSplit
from reidcli.retrieval.metrics import GalleryGroups, positive_ranks, summarize


def market_like(nq: int, ng: int, ids: int, d: int = 768, cams: int = 6, seed: int = 0, noise: float = 1.2):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids + 1, d)).astype(np.float32)
    gp = rng.integers(0, ids + 1, ng)
    qp = rng.integers(1, ids + 1, nq)

    def feats(p):
        x = centers[p] + noise * rng.normal(size=(len(p), d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return (
        FeatureSplit(feats(qp), qp, rng.integers(0, cams, nq)),
        FeatureSplit(feats(gp), gp, rng.integers(0, cams, ng)),
    )


TRAINED = 2.3  # feature noise giving mAP ≈ 0.89, mINP ≈ 0.38: a trained Market model
WEAK = 3.0  # mAP ≈ 0.32: positives spread through the gallery, the counting's worst regime


def timed(fn, reps: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def ours_from_distmat(dist: torch.Tensor, q: FeatureSplit, g: FeatureSplit, chunk: int = 512):
    """Metrics from a distance matrix, chunk by chunk (scores are the negated distances)."""
    qp, qc = torch.from_numpy(q.pids), torch.from_numpy(q.camids)
    gp, gc = torch.from_numpy(g.pids), torch.from_numpy(g.camids)
    groups = GalleryGroups(gp, gc)
    parts = [
        positive_ranks(-dist[i : i + chunk], qp[i : i + chunk], qc[i : i + chunk], gp, gc, groups)
        for i in range(0, len(qp), chunk)
    ]
    return summarize(parts)


def market(peer_dir: str | None, noise: float) -> dict:
    q, g = market_like(3368, 15913, 750, noise=noise)
    res = {}
    qt, gt = torch.from_numpy(q.feats), torch.from_numpy(g.feats)
    res["distmat_s"], dist = timed(lambda: 2 - 2 * qt @ gt.T)
    res["ours_from_distmat_s"], ours = timed(lambda: ours_from_distmat(dist, q, g))
    res["ours_full_torch_s"], full = timed(lambda: evaluate(q, g, EvalConfig(engine="torch", device="cpu")).seconds, 2)
    res["ours_full_faiss_s"], _ = timed(lambda: evaluate(q, g, EvalConfig(engine="faiss", device="cpu")).seconds, 2)
    res["mAP"], res["mINP"], res["rank1"] = ours.mAP, ours.mINP, ours.cmc[0]
    if peer_dir:
        sys.path.insert(0, peer_dir)
        import rank_cy

        d = dist.numpy().astype(np.float32)
        args = (
            d,
            q.pids.astype(np.int64),
            g.pids.astype(np.int64),
            q.camids.astype(np.int64),
            g.camids.astype(np.int64),
            50,
        )
        res["torchreid_cython_s"], (cmc, mAP) = timed(lambda: rank_cy.eval_market1501_cy(*args), 1)
        res["torchreid_mAP"], res["torchreid_rank1"] = float(mAP), float(cmc[0])
        res["speedup_vs_torchreid_same_distmat"] = res["torchreid_cython_s"] / res["ours_from_distmat_s"]
        res["speedup_vs_torchreid_incl_distmat"] = (res["torchreid_cython_s"] + res["distmat_s"]) / res[
            "ours_full_torch_s"
        ]
    return res


def big(nq: int, ng: int, ids: int, noise: float = TRAINED) -> dict:
    q, g = market_like(nq, ng, ids, seed=1, noise=noise)
    t = time.perf_counter()
    out = evaluate(q, g, EvalConfig(engine="torch", device="cpu"))
    return {
        "size": [nq, ng],
        "seconds": out.seconds,
        "wall_s": time.perf_counter() - t,
        "mAP": out.metrics.mAP,
        "mINP": out.metrics.mINP,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-dir")
    ap.add_argument("--msmt", action="store_true", help="also 11,659 × 82,161")
    ap.add_argument("--big", action="store_true", help="also 3,368 × 500,000")
    ap.add_argument("--out", default="benchmarks/results/cpu_eval.json")
    args = ap.parse_args()
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "market_3368x15913_trained_like": market(args.peer_dir, TRAINED),
        "market_3368x15913_weak": market(args.peer_dir, WEAK),
    }
    if args.msmt:
        res["msmt17_11659x82161"] = big(11659, 82161, 3060)
    if args.big:
        res["market500k_3368x500000"] = big(3368, 500_000, 750)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
