"""``evaluate --roc``: TPR at fixed FPRs over every query–gallery pair, exact, block by block."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from reidcli.errors import ConfigError
from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.features import FeatureSplit, write_features
from reidcli.retrieval.roc import RocCounter, parse_fprs
from tests.conftest import run_cli, run_cli_here
from tests.retrieval.reference import market_like, tpr_at_fpr

FPRS = (0.002, 0.01, 0.1, 0.5)
SMALL = (0.001, 0.003, 0.01)


def _splits(seed=0, levels=None, **kw):
    q, qp, qc, g, gp, gc = market_like(np.random.default_rng(seed), **kw)
    if levels:  # few distinct values: many tied scores, some straddling the thresholds
        q, g = np.round(q * levels) / levels, np.round(g * levels) / levels
    return FeatureSplit(q.astype(np.float32), qp, qc), FeatureSplit(g.astype(np.float32), gp, gc)


@pytest.mark.parametrize(
    ("seed", "levels", "rows", "fprs"),
    [(0, None, 7, FPRS), (1, 2, 5, FPRS), (2, 1, 64, FPRS), (3, None, 3, SMALL), (4, 2, 2, SMALL), (5, 4, 4, SMALL)],
)
def test_block_by_block_counts_equal_the_definition(seed, levels, rows, fprs):
    """Small rates keep few negatives: the running threshold and the cuts (with ties at levels 1 and 2) run."""
    query, gallery = _splits(seed, levels, num_query=30, num_gallery=160)
    scores = query.feats @ gallery.feats.T
    labels = (query.pids, query.camids, gallery.pids, gallery.camids)
    t = {k: torch.from_numpy(v) for k, v in zip(("qp", "qc", "gp", "gc"), labels, strict=True)}
    counter = RocCounter(t["gp"], t["gc"], t["qp"], fprs)
    for i in range(0, len(scores), rows):
        counter.add(torch.from_numpy(scores[i : i + rows]), t["qp"][i : i + rows], t["qc"][i : i + rows])
    assert (counter.threshold > -np.inf) == (fprs == SMALL)  # a cut before the end sets the running threshold
    got = counter.result()
    negatives = np.sort(scores[query.pids[:, None] != gallery.pids[None, :]])
    np.testing.assert_array_equal(np.sort(counter.top.numpy()), negatives[len(negatives) - counter.keep :])
    want = tpr_at_fpr(scores, query.pids, gallery.pids, query.camids, gallery.camids, fprs)
    np.testing.assert_allclose(got.tpr, want, rtol=0, atol=1e-12)
    same = query.pids[:, None] == gallery.pids[None, :]
    assert got.negatives == int((~same).sum())
    assert got.positives == int((same & (query.camids[:, None] != gallery.camids[None, :])).sum())
    for f, threshold in zip(fprs, got.threshold, strict=True):  # at most ⌊f·negatives⌋ negatives pass
        assert (scores[~same] > threshold).sum() <= np.floor(f * got.negatives)
    assert list(got.tpr) == sorted(got.tpr) and 0 < got.tpr[-1] <= 1
    # the curve: log-spaced rates with the asked ones among them, each point the definition's value
    assert list(got.curve_tpr) == sorted(got.curve_tpr) and set(fprs) <= set(got.curve_fpr)
    some = got.curve_fpr[::16]
    picked = [t for f, t in zip(got.curve_fpr, got.curve_tpr, strict=True) if f in some]
    want = tpr_at_fpr(scores, query.pids, gallery.pids, query.camids, gallery.camids, some)
    np.testing.assert_allclose(picked, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cfg", [{"engine": "torch"}, {"engine": "faiss"}, {"rerank": True}, {"aqe": True}])
def test_evaluate_reports_the_roc_of_the_scores_it_ranked(cfg):
    query, gallery = _splits(3, num_query=40, num_gallery=250)
    out = evaluate(query, gallery, EvalConfig(device="cpu", roc=FPRS, **cfg))
    plain = evaluate(query, gallery, EvalConfig(device="cpu", **cfg))
    assert out.metrics.mAP == plain.metrics.mAP and plain.roc is None  # the ROC changes nothing else
    if cfg.get("rerank"):
        from reidcli.retrieval.rerank import k_reciprocal_rerank

        scores = -k_reciprocal_rerank(torch.from_numpy(query.feats), torch.from_numpy(gallery.feats)).numpy()
    elif cfg.get("aqe"):
        q, g = out.expanded
        scores = q.feats @ g.feats.T
    else:
        scores = query.feats @ gallery.feats.T
    want = tpr_at_fpr(scores, query.pids, gallery.pids, query.camids, gallery.camids, FPRS)
    np.testing.assert_allclose(out.roc.tpr, want, rtol=0, atol=1e-12)


def test_cli_roc_table_json_and_csv(tmp_path):
    query, gallery = _splits(4, num_query=30, num_gallery=200)
    write_features(tmp_path / "f.h5", {"query": query, "gallery": gallery}, {"run": "r"})
    r = run_cli("evaluate", str(tmp_path / "f.h5"), "--roc", "--fpr", "0.1,0.01", "--out", str(tmp_path / "o"),
                "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    roc = json.loads(r.stdout)["roc"]
    assert roc["fpr"] == [0.01, 0.1] and len(roc["tpr"]) == 2 and roc["seconds"] >= 0
    row = pd.read_csv(tmp_path / "o" / "results.csv").iloc[0]
    assert row["TPR@FPR=1e-02"] == pytest.approx(roc["tpr"][0]) and row["TPR@FPR=1e-01"] == pytest.approx(roc["tpr"][1])
    assert json.loads((tmp_path / "o" / "results.json").read_text())["roc"]["tpr"] == roc["tpr"]
    curve = pd.read_csv(tmp_path / "o" / "roc.csv")
    assert curve["fpr"].tolist() == pytest.approx(roc["curve_fpr"]) and curve["tpr"].is_monotonic_increasing
    assert (tmp_path / "o" / "roc.png").stat().st_size > 5000
    r = run_cli_here("evaluate", str(tmp_path / "f.h5"), "--fpr", "0.1")
    assert r.returncode == 1 and "--fpr has no effect without --roc" in r.stderr
    with pytest.raises(ConfigError, match="between 0 and 1"):
        parse_fprs("0.1,2")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        parse_fprs("abc")
    assert parse_fprs("1e-2, 1e-3,1e-2") == (1e-3, 1e-2)
