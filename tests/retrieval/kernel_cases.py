"""The Triton ranking kernel against the torch methods and the numpy reference, run under ``TRITON_INTERPRET=1``
(the interpreter must be chosen before Triton is imported, so the tests start this file in its own process).
Exits non-zero, with the failing case named, on any difference."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reidcli.retrieval.evaluate import EvalConfig, evaluate  # noqa: E402
from reidcli.retrieval.features import FeatureSplit  # noqa: E402
from reidcli.retrieval.metrics import GalleryGroups, positive_ranks, ranks_in_blocks, summarize  # noqa: E402
from reidcli.retrieval.rank_kernel import kernel_ranks  # noqa: E402
from tests.retrieval.reference import eval_market1501, market_like  # noqa: E402


def same_ranks(name: str, scores: torch.Tensor, qp, qc, gp, gc) -> None:
    t = [torch.as_tensor(a) for a in (qp, qc, gp, gc)]
    ref = positive_ranks(scores, *t, method="count")
    got = positive_ranks(scores, *t, method="kernel")
    p = ref.ranks.shape[1]
    assert got.ranks.shape[1] >= max(p, 16), name
    assert torch.equal(got.ranks[:, :p], ref.ranks), f"{name}: ranks differ"
    assert bool((got.ranks[:, p:] == -1).all()), f"{name}: padding"
    assert torch.equal(got.num_pos, ref.num_pos) and torch.equal(got.num_valid, ref.num_valid), f"{name}: counts"
    dist = -scores.numpy().astype(np.float64)
    cmc, mAP, mINP, n = eval_market1501(dist, *(np.asarray(a) for a in (qp, gp, qc, gc)))
    m = summarize([got])
    assert m.num_valid_queries == n and abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6, name
    assert np.allclose(m.cmc, cmc, atol=1e-6), name
    print(f"ok {name}: {int((got.ranks >= 0).sum())} positives")


def main() -> None:
    rng = np.random.default_rng(0)
    # Market-like rows, good and bad queries, a query without any match
    q, qp, qc, g, gp, gc = market_like(rng, num_query=24, num_gallery=400, noise=0.6)  # a program per query: slow
    q[::4] = rng.normal(size=q[::4].shape)
    same_ranks("market-like", torch.as_tensor(q @ g.T), qp, qc, gp, gc)
    # exact ties everywhere (rounded scores), ±0, duplicated gallery features
    g[300:350] = g[0:50]
    scores = torch.as_tensor(np.round(q @ g.T, 1).astype(np.float32))
    scores[0, :7] = -0.0
    scores[0, 7:14] = 0.0
    same_ranks("ties, ±0, duplicates", scores, qp, qc, gp, gc)
    # a collapsed model: every score equal
    same_ranks("all equal", torch.zeros(len(qp), len(gp)), qp, qc, gp, gc)
    # a gallery wider than one scan block (2,048), so blocks below the weakest positive are skipped, and a
    # same-pid list wider than 16 (the kernel's width becomes 64)
    n = 2600
    gp2 = rng.integers(0, 60, n)
    gp2[:80] = 7  # a group of over 64: the kernel runs 128 wide
    gc2 = rng.integers(0, 6, n)
    qp2, qc2 = rng.integers(1, 60, 8), rng.integers(0, 6, 8)  # a program per query: 8 keep it quick
    qp2[:3] = 7
    scores2 = torch.as_tensor(rng.normal(size=(8, n)).astype(np.float32))
    scores2[5] += torch.as_tensor((gp2 == qp2[5]) * 3.0, dtype=torch.float32)  # positives first: most blocks skip
    same_ranks("wide gallery, skipped blocks", scores2, qp2, qc2, gp2, gc2)
    # a chunk's view with a row stride (the evaluation passes slices of larger matrices)
    m = 500
    wide = torch.as_tensor(rng.normal(size=(8, m + 17)).astype(np.float32))
    view = wide[:, 5 : 5 + m]
    t = [torch.as_tensor(a) for a in (qp2, qc2, gp2[:m], gc2[:m])]
    groups = GalleryGroups(t[2], t[3])
    lo, counts = groups.spans(t[0])
    a = kernel_ranks(view, groups.order, lo, counts, int(counts.max()), *t)[0]
    b = positive_ranks(view.contiguous(), *t, method="count").ranks
    assert torch.equal(a[:, : b.shape[1]], b), "strided view"
    print("ok strided view")
    # distances (re-ranking's blocks are negated) and the whole evaluation with counting="kernel"
    qf, gf = FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc)
    out = evaluate(qf, gf, EvalConfig(engine="torch", device="cpu", counting="kernel")).metrics
    ref = evaluate(qf, gf, EvalConfig(engine="torch", device="cpu", counting="count")).metrics
    assert out.to_dict() == ref.to_dict(), "evaluate(counting='kernel')"
    d = torch.as_tensor(1.0 - q @ g.T)  # distances: lower is closer, negated block by block
    tensors = [torch.as_tensor(a) for a in (qp, qc, gp, gc)]
    by_kernel = summarize(ranks_in_blocks(d, *tensors, distances=True, method="kernel"))
    by_count = summarize(ranks_in_blocks(d, *tensors, distances=True, method="count"))
    assert by_kernel.to_dict() == by_count.to_dict(), "distances"
    print("ok evaluate and distances")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
