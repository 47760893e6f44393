import numpy as np
import pytest
import torch

from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.features import FeatureSplit
from reidcli.retrieval.rerank import k_reciprocal_rerank
from tests.retrieval.reference import eval_market1501, market_like, re_ranking


def _sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("chunk", [64, 16, 7])  # one block of queries; blocks across the query/gallery border
@pytest.mark.parametrize(
    ("k1", "k2", "lam", "seed"),
    # the last two: k2 beyond the k1 + 1 nearest (was a RuntimeError), k1 beyond the 180 images (clamped as the
    # published code's slices do)
    [(20, 6, 0.3, 0), (5, 1, 0.5, 1), (7, 3, 0.0, 2), (4, 9, 0.3, 3), (200, 6, 0.3, 4)],
)
def test_equals_the_published_algorithm(k1, k2, lam, seed, chunk):
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=30, num_gallery=150)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    ref = re_ranking(_sq(q64, g64), _sq(q64, q64), _sq(g64, g64), k1=k1, k2=k2, lambda_value=lam)
    ours = k_reciprocal_rerank(torch.from_numpy(q), torch.from_numpy(g), k1, k2, lam, chunk=chunk).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_compiled_and_torch_joins_and_a_small_pair_budget_give_the_same_overlaps(monkeypatch):
    from reidcli.retrieval import rerank

    rng = np.random.default_rng(3)
    q, _, _, g, _, _ = market_like(rng, num_query=20, num_gallery=80)
    x = torch.from_numpy(np.concatenate([q, g]))
    knn, knn_dist, row_max, _ = rerank._neighbours(x, 21, 20, 32)
    cand, mask = rerank._expansion_sets(knn, 20, 16)
    v = rerank._weights(x, cand, mask, row_max, knn, knn_dist, 16)
    compiled = rerank._jaccard_overlap(v, 20)  # the C join where it is built (asserted in test_metrics)
    monkeypatch.setattr(rerank.native, "module", lambda: None)
    in_torch = rerank._jaccard_overlap(v, 20)
    assert float(in_torch.sum()) > 1.0
    torch.testing.assert_close(compiled, in_torch, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_torch, rerank._jaccard_overlap(v, 20, pair_budget=7))


@pytest.mark.parametrize("chunk", [1000, 9])
def test_weights_from_the_lists_and_from_features_agree(chunk):
    """Expanded-set members in the row's k nearest take the list's distance, the others (asserted present) are
    computed from the features: V equals exp(−d/max) from float64 distances, row-normalised."""
    from reidcli.retrieval import rerank

    rng = np.random.default_rng(5)
    q, _, _, g, _, _ = market_like(rng, num_query=25, num_gallery=120)
    x = torch.from_numpy(np.concatenate([q, g]))
    k1 = 6
    knn, knn_dist, row_max, _ = rerank._neighbours(x, k1 + 1, 25, 32)
    cand, mask = rerank._expansion_sets(knn, k1, 16)
    beyond = mask & ~(cand[:, :, None] == knn[:, None, :]).any(-1)
    assert int(beyond.sum()) > 10  # the second way is exercised
    v = rerank._weights(x, cand, mask, row_max, knn, knn_dist, chunk).to_dense().double()
    x64 = x.double()
    d = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    ref = torch.zeros_like(d)
    rows = torch.arange(len(x))[:, None].expand_as(cand)
    ref[rows[mask], cand[mask]] = torch.exp(-d[rows[mask], cand[mask]] / row_max.double()[rows[mask]])
    ref /= ref.sum(1, keepdim=True)
    torch.testing.assert_close(v, ref, rtol=0, atol=2e-6)


def test_rerank_in_evaluate_matches_reference_metrics():
    rng = np.random.default_rng(4)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=30, num_gallery=150)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    dist = re_ranking(_sq(q64, g64), _sq(q64, q64), _sq(g64, g64))
    _, mAP, mINP, _ = eval_market1501(dist, qp, gp, qc, gc)
    out = evaluate(FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc), EvalConfig(rerank=True))
    assert out.engine == "torch+rerank"
    assert abs(out.metrics.mAP - mAP) < 1e-6 and abs(out.metrics.mINP - mINP) < 1e-6


def test_ranked_list_picture_after_reranking(tiny_data, tmp_path):
    from reidcli.data.store import read_dataset
    from reidcli.report.ranked import write_ranked_lists

    _, parts = read_dataset(tiny_data, ("query", "gallery"), images=False)
    rng = np.random.default_rng(0)

    def feats(split):
        x = rng.normal(size=(len(split), 16)).astype(np.float32)
        return FeatureSplit(x / np.linalg.norm(x, axis=1, keepdims=True), split.pids, split.camids, split.paths)

    q, g = feats(parts["query"]), feats(parts["gallery"])
    for name, rerank in (("plain.png", None), ("rerank.png", EvalConfig(rerank=True, k1=5, k2=2))):
        assert write_ranked_lists(tmp_path / name, q, g, tiny_data, 3, 4, rerank) == [tmp_path / name]
        assert (tmp_path / name).stat().st_size > 2000
    # more queries than one picture holds: numbered pages, 16 queries each
    pages = write_ranked_lists(tmp_path / "many.png", q, g, tiny_data, 20, 4)
    assert [p.name for p in pages] == ["many_01.png", "many_02.png"] and not (tmp_path / "many.png").exists()
    assert all(p.stat().st_size > 2000 for p in pages)


def test_read_images_reads_just_the_rows_asked_in_their_order(tiny_data):
    from reidcli.data.store import read_dataset, read_images

    _, parts = read_dataset(tiny_data, ("gallery",))
    rows = np.array([[5, 0, 5], [len(parts["gallery"]) - 1, 2, 1]])
    np.testing.assert_array_equal(read_images(tiny_data, "gallery", rows), parts["gallery"].images[rows])
    runs = np.r_[0:3, 7, 9:14, len(parts["gallery"]) - 2 : len(parts["gallery"])]  # runs and single rows
    np.testing.assert_array_equal(read_images(tiny_data, "gallery", runs), parts["gallery"].images[runs])
    assert read_images(tiny_data, "gallery", np.array([], np.int64)).shape == (0, *parts["gallery"].images.shape[1:])


@pytest.mark.parametrize("chunk", [64, 7])
def test_compiled_neighbour_fold_equals_the_torch_top_k(monkeypatch, chunk):
    """The compiled fold (rows and columns of each block, no transposed copy) against torch's top-k merges: the
    same neighbours, distances and row maxima; with duplicated features (equal distances) the same distances."""
    from reidcli.retrieval import native, rerank

    assert native.available()  # the CPU kernels are built here (asserted with a compiler in test_metrics)
    rng = np.random.default_rng(6)
    q, _, _, g, _, _ = market_like(rng, num_query=30, num_gallery=170)
    for dup in (False, True):
        if dup:
            g[100:140] = g[0:40]
        x = torch.from_numpy(np.concatenate([q, g]))
        compiled = rerank._neighbours(x, 21, 30, chunk)
        with monkeypatch.context() as m:
            m.setattr(rerank.native, "module", lambda: None)
            plain = rerank._neighbours(x, 21, 30, chunk)
        if not dup:
            assert torch.equal(compiled[0], plain[0])
        torch.testing.assert_close(compiled[1], plain[1], rtol=0, atol=1e-6)  # sorted distances
        assert torch.equal(compiled[2], plain[2])  # row maxima
        torch.testing.assert_close(compiled[3], plain[3])
        d = x[compiled[0]] - x[:, None, :]  # the listed neighbours' own distances
        torch.testing.assert_close((d * d).sum(-1), compiled[1], rtol=0, atol=1e-5)


def test_expansion_sets_in_small_blocks_equal_one_block():
    """The expanded sets are built in row blocks sized by a memory budget (a k1 near the image count had asked for
    (k1 + 1)³ values per row, 18 GB on 1,538 images): any block size gives the same sets."""
    from reidcli.retrieval import rerank

    rng = np.random.default_rng(6)
    q, _, _, g, _, _ = market_like(rng, num_query=20, num_gallery=90)
    x = torch.from_numpy(np.concatenate([q, g]))
    for k1 in (20, 109):  # the default, and every other image
        knn, _, _, _ = rerank._neighbours(x, k1 + 1, 20, 32)
        whole = rerank._expansion_sets(knn, k1, 10_000, budget=1 << 30)
        for budget in (1, 5_000):
            blocks = rerank._expansion_sets(knn, k1, 10_000, budget=budget)
            assert torch.equal(blocks[0], whole[0]) and torch.equal(blocks[1], whole[1])
        assert bool(whole[1].any(1).all())


def test_queries_by_ap_picks_the_lowest_or_highest_ap_first():
    from reidcli.report.ranked import queries_by_ap

    per_query = {"AP": np.array([0.5, np.nan, 0.1, 0.9, 0.1, 0.3])}  # query 1 has no valid match
    rows, labels = queries_by_ap(per_query, 3, worst=True)
    assert rows.tolist() == [2, 4, 5] and labels[0] == "query 2\nAP 0.10"  # a tie in query order
    assert queries_by_ap(per_query, 10, worst=False)[0].tolist() == [3, 0, 5, 2, 4]  # never the query without AP


def test_cli_ranked_lists_of_the_worst_queries(both_run, tiny_data, tmp_path):
    import pandas as pd

    from tests.conftest import run_cli_here

    root, _ = both_run
    args = ("evaluate", str(root / "f.h5"), "--out", str(tmp_path / "o"), "--data", str(tiny_data))
    r = run_cli_here(*args, "--visualize", "3", "--show", "worst", "--top-k", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "ranked_lists.png").stat().st_size > 2000
    table = pd.read_csv(tmp_path / "o" / "per_query.csv")
    assert table["AP"].notna().sum() >= 3  # the picture's three queries: the three lowest APs of this table
    for extra, message in [
        (("--show", "worst"), "--show has no effect without --visualize N"),
        (("--visualize", "2", "--show", "middle"), "unknown --show 'middle'; choose one of spread, worst, best"),
    ]:
        r = run_cli_here(*args[:2], "--out", str(tmp_path / "x"), *extra)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "x").exists()
