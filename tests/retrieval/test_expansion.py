"""α-query expansion (`reid evaluate --aqe`) against a plain-numpy reference of its definition."""

import numpy as np
import pytest
import torch

from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.expansion import alpha_query_expansion
from reidcli.retrieval.features import FeatureSplit
from tests.retrieval.reference import alpha_query_expansion as reference_aqe
from tests.retrieval.reference import eval_market1501, market_like, re_ranking


@pytest.mark.parametrize(("k", "alpha"), [(5, 3.0), (1, 3.0), (10, 0.0), (400, 1.5)])
def test_expanded_features_equal_the_reference_in_any_block_size(k, alpha):
    rng = np.random.default_rng(0)
    q, _, _, g, _, _ = market_like(rng, num_query=40, num_gallery=300, dim=16)
    x = np.concatenate([q, g])
    ref = reference_aqe(x, k, alpha)
    for budget in (None, 1, 1000):
        ours = alpha_query_expansion(torch.from_numpy(x), k, alpha, budget=budget).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-6)
    if k == 1:  # itself only: the features unchanged
        np.testing.assert_allclose(ref, x, atol=1e-6)


@pytest.mark.parametrize("engine", ["faiss", "torch", "rerank"])
def test_evaluation_with_aqe_equals_the_protocol_on_expanded_features(engine):
    rng = np.random.default_rng(1)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=40, num_gallery=300, dim=16, noise=1.2)
    x = reference_aqe(np.concatenate([q, g]), 5, 3.0)
    eq, eg = x[: len(q)], x[len(q) :]
    if engine == "rerank":
        sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
        dist = re_ranking(sq(eq, eg), sq(eq, eq), sq(eg, eg))
    else:
        dist = -(eq @ eg.T)
    cmc, mAP, mINP, n = eval_market1501(dist, qp, gp, qc, gc)
    cfg = EvalConfig(engine="torch" if engine == "rerank" else engine, rerank=engine == "rerank", aqe=True)
    out = evaluate(FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc), cfg)
    plain = evaluate(FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc), EvalConfig(engine="torch"))
    assert out.engine.startswith("aqe+") and out.metrics.num_valid_queries == n
    assert abs(out.metrics.mAP - mAP) < 1e-5 and abs(out.metrics.mINP - mINP) < 1e-5
    np.testing.assert_allclose(out.metrics.cmc, cmc, atol=1e-6)
    assert out.metrics.mAP != pytest.approx(plain.metrics.mAP, abs=1e-3)  # the expansion changed something
    # the splits as evaluated come back, for the ranked-list pictures (no second expansion); without --aqe, none
    np.testing.assert_allclose(np.concatenate([s.feats for s in out.expanded]), x, atol=2e-6)
    assert [s.pids.tolist() for s in out.expanded] == [qp.tolist(), gp.tolist()] and plain.expanded is None
