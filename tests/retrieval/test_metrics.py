import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reidcli.errors import ConfigError, FormatError
from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.features import FeatureSplit
from reidcli.retrieval.metrics import positive_ranks, summarize
from tests.retrieval.reference import eval_market1501, market_like, per_query_market1501


def _eval_scores(scores, qp, qc, gp, gc, max_rank=50, method="count"):
    t = [torch.as_tensor(a) for a in (scores, qp, qc, gp, gc)]
    return summarize([positive_ranks(*t, method=method)], max_rank)


# the CPU's compiled scan and its torch fallback, the GPU's sorted keys
METHODS = pytest.mark.parametrize("method", ["scan", "count", "sort"])


@METHODS
def test_hand_computed_case(method):
    # one query (pid 1, cam 0); gallery in score order: junk(1,c0), neg, pos(1,c1), neg, pos(1,c2)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    gp, gc = np.array([1, 2, 1, 3, 1]), np.array([0, 0, 1, 1, 2])
    m = _eval_scores(scores, np.array([1]), np.array([0]), gp, gc, max_rank=4, method=method)
    # valid order: neg, pos, neg, pos → positives at ranks 1 and 3 (0-based)
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mINP == pytest.approx(2 / 4)
    assert m.cmc == [0.0, 1.0, 1.0, 1.0]
    assert m.num_valid_queries == 1


@METHODS
def test_ties_are_broken_by_gallery_order(method):
    scores = np.array([[0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    gp, gc = np.array([2, 1, 3, 1]), np.array([1, 1, 1, 2])
    m = _eval_scores(scores, np.array([1]), np.array([0]), gp, gc, max_rank=4, method=method)
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)  # stable order: neg, pos, neg, pos
    ref = eval_market1501(-scores, np.array([1]), gp, np.array([0]), gc, max_rank=4)
    assert m.mAP == pytest.approx(ref[1])


@METHODS
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_reference_on_market_like_features(seed, method):
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, noise=0.8 + 0.3 * seed)
    scores = q @ g.T
    cmc, mAP, mINP, n = eval_market1501(-scores.astype(np.float64), qp, gp, qc, gc)
    m = _eval_scores(scores, qp, qc, gp, gc, method=method)
    assert m.num_valid_queries == n < len(qp)
    assert abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6
    np.testing.assert_allclose(m.cmc, cmc, atol=1e-6)


@METHODS
def test_rows_counted_in_place_and_gathered_agree_with_reference(method):
    """Good queries (few items above their weakest positive) are gathered, bad ones counted in place."""
    rng = np.random.default_rng(11)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=40, num_gallery=400, noise=0.3)
    q[::2] = rng.normal(size=q[::2].shape)  # every other query: a random feature, positives anywhere
    scores = q @ g.T
    _, mAP, mINP, _ = eval_market1501(-scores.astype(np.float64), qp, gp, qc, gc)
    m = _eval_scores(scores, qp, qc, gp, gc, method=method)
    assert abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6


@METHODS
def test_duplicate_features_ties_match_reference(method):
    rng = np.random.default_rng(7)
    q, qp, qc, g, gp, gc = market_like(rng, num_gallery=120)
    g[60:90] = g[0:30]  # exact duplicates: equal scores for many (query, item) pairs
    q = np.round(q, 1)
    g = np.round(g, 1)
    scores = (q.astype(np.float64) @ g.T.astype(np.float64)).astype(np.float32)
    _, mAP, mINP, _ = eval_market1501(-scores, qp, gp, qc, gc)
    m = _eval_scores(scores, qp, qc, gp, gc, method=method)
    assert abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["scan", "count", "sort"]))
def test_invariant_to_gallery_permutation_and_perfect_when_positives_lead(seed, method):
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=10, num_gallery=80)
    scores = q @ g.T
    perm = rng.permutation(len(gp))
    a = _eval_scores(scores, qp, qc, gp, gc, method=method)
    b = _eval_scores(scores[:, perm], qp, qc, gp[perm], gc[perm], method=method)
    assert abs(a.mAP - b.mAP) < 1e-9 and a.cmc == b.cmc
    perfect = np.where(gp[None, :] == qp[:, None], 1.0 + scores, scores - 2.0).astype(np.float32)
    m = _eval_scores(perfect, qp, qc, gp, gc, method=method)
    assert m.num_valid_queries == 0 or (m.mAP == pytest.approx(1.0) and m.mINP == pytest.approx(1.0))


def _splits(seed=0, **kw):
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, **kw)
    return FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc)


@pytest.mark.parametrize("depth", [1, 5, 400])
def test_faiss_lists_plus_counting_equal_torch(depth):
    query, gallery = _splits(3, num_query=60, num_gallery=400)
    a = evaluate(query, gallery, EvalConfig(engine="torch", device="cpu"))
    b = evaluate(query, gallery, EvalConfig(engine="faiss", depth=depth, device="cpu"))
    assert abs(a.metrics.mAP - b.metrics.mAP) < 1e-6 and abs(a.metrics.mINP - b.metrics.mINP) < 1e-6
    np.testing.assert_allclose(a.metrics.cmc, b.metrics.cmc, atol=1e-6)
    assert b.engine == "faiss" and not b.metrics.approximate


def _exact_tie_splits(seed=5, collapsed=False):
    """Features whose inner products are exact in float32 in any summation order (quarters, 16-d), with many
    duplicate gallery rows: every GEMM gives the same scores, with exact ties everywhere."""
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=50, num_gallery=300)
    q, g = np.round(q * 4) / 4, np.round(g * 4) / 4
    g[150:250] = g[0:100]
    if collapsed:
        q[:], g[:] = q[0], q[0]
    return FeatureSplit(q.astype(np.float32), qp, qc), FeatureSplit(g.astype(np.float32), gp, gc)


@pytest.mark.parametrize("collapsed", [False, True])
@pytest.mark.parametrize("depth", [1, 3, 10, 40, 300])
def test_faiss_engine_breaks_exact_ties_by_gallery_order(depth, collapsed, tmp_path):
    """FAISS's heaps order equal scores by descending id and may cut a tie at the list's end: the lists are
    reordered by (score, gallery row) and a positive tied with the list's last score is counted instead."""
    from reidcli.retrieval.index import IndexConfig, build_index

    query, gallery = _exact_tie_splits(collapsed=collapsed)
    scores = query.feats.astype(np.float64) @ gallery.feats.T.astype(np.float64)
    _, mAP, mINP, _ = eval_market1501(-scores, query.pids, gallery.pids, query.camids, gallery.camids)
    cfg = EvalConfig(engine="faiss", depth=depth, device="cpu")
    on_the_fly = evaluate(query, gallery, cfg)
    built = evaluate(query, gallery, cfg, build_index(gallery.feats, IndexConfig(kind="flat")))
    torch_engine = evaluate(query, gallery, EvalConfig(engine="torch", device="cpu"))
    for out in (on_the_fly, built, torch_engine):
        assert abs(out.metrics.mAP - mAP) < 1e-9 and abs(out.metrics.mINP - mINP) < 1e-9
        assert out.metrics.cmc == torch_engine.metrics.cmc


@pytest.mark.parametrize("depth", [2, 10, 40])
def test_lists_from_faiss_search_with_their_scores_give_the_counted_ranks(depth):
    """The path GPU FAISS and IVF indexes take: index.search's lists (FAISS's tie order) reordered by their
    scores; every query they call complete has exactly the counted ranks."""
    import faiss

    from reidcli.retrieval.metrics import ranks_from_lists

    query, gallery = _exact_tie_splits(seed=9)
    index = faiss.IndexFlatIP(gallery.feats.shape[1])
    index.add(gallery.feats)
    values, lists = index.search(query.feats, depth)
    t = [torch.as_tensor(a) for a in (query.pids, query.camids, gallery.pids, gallery.camids)]
    found, complete = ranks_from_lists(torch.from_numpy(lists), *t, scores=torch.from_numpy(values))
    counted = positive_ranks(torch.as_tensor(query.feats @ gallery.feats.T), *t, method="count")
    assert 0 < int(complete.sum()) < len(complete)  # both kinds of query occur
    for row in complete.nonzero()[:, 0].tolist():
        n = int(counted.num_pos[row])
        assert found.ranks[row, :n].tolist() == counted.ranks[row, :n].tolist(), row


def test_lists_in_faiss_tie_order_are_reordered_and_a_cut_tie_is_counted():
    import faiss

    from reidcli.retrieval.metrics import ranks_from_lists

    gallery = np.ones((4, 2), dtype=np.float32)  # four equal scores: rows 0 neg, 1 pos, 2 neg, 3 pos
    t = [torch.tensor(a) for a in ([1], [0], [2, 1, 3, 1], [0, 1, 0, 2])]
    index = faiss.IndexFlatIP(2)
    index.add(gallery)
    values, lists = index.search(np.ones((1, 2), dtype=np.float32), 4)
    raw, _ = ranks_from_lists(torch.from_numpy(lists), *t)
    fixed, complete = ranks_from_lists(torch.from_numpy(lists), *t, scores=torch.from_numpy(values))
    assert lists[0].tolist() == [3, 2, 1, 0] and raw.ranks.tolist() == [[0, 2]]  # FAISS: equal scores, high id first
    assert fixed.ranks.tolist() == [[1, 3]] and complete.tolist() == [True]  # gallery order: neg, pos, neg, pos
    values, lists = index.search(np.ones((1, 2), dtype=np.float32), 3)  # the tie is cut: one equal item left out
    _, complete = ranks_from_lists(torch.from_numpy(lists), *t, scores=torch.from_numpy(values))
    assert complete.tolist() == [False]


@pytest.mark.parametrize("depth", [3, 60])
@pytest.mark.parametrize("path", ["torch", "faiss on the fly", "faiss flat index", "faiss search lists", "rerank"])
def test_per_query_results_equal_the_reference_row_for_row(path, depth, monkeypatch):
    """Every engine path labels its ranked parts with their query rows (blocks of 16 here, lists of 3 or 60, the
    counted tails of the FAISS paths in other orders): AP, INP, first hit and positives land on the right query."""
    import reidcli.retrieval.evaluate as ev
    import reidcli.retrieval.index as ix

    # noise 0.5: at depth 3 most of a block's queries need counting, at depth 60 a few (both ways of counting tails)
    query, gallery = _splits(6, num_query=70, num_gallery=400, noise=0.5)
    monkeypatch.setattr(ev, "_chunk_rows", lambda *a: 16)
    cfg = EvalConfig(engine="torch" if path == "torch" else "faiss", depth=depth, device="cpu", rerank=path == "rerank")
    index = ix.build_index(gallery.feats, ix.IndexConfig(kind="flat")) if path == "faiss flat index" else None
    if path == "faiss search lists":  # the path of GPU FAISS and IVF: index.search, then counting of the tails
        monkeypatch.setattr(ix, "flat_vectors", lambda index: None)
        index = ix.build_index(gallery.feats, ix.IndexConfig(kind="flat"))
    if path == "rerank":
        from reidcli.retrieval.rerank import k_reciprocal_rerank

        dist = k_reciprocal_rerank(torch.from_numpy(query.feats), torch.from_numpy(gallery.feats), 20, 6, 0.3)
        dist = dist.numpy()
    else:
        dist = -(query.feats.astype(np.float64) @ gallery.feats.T.astype(np.float64))
    ref = per_query_market1501(dist, query.pids, gallery.pids, query.camids, gallery.camids)
    got = evaluate(query, gallery, cfg, index).metrics
    assert np.isnan(ref["AP"]).any() and not np.isnan(ref["AP"]).all()  # queries without a match occur
    np.testing.assert_array_equal(got.per_query["positives"], ref["positives"])
    for key in ("first_hit_rank", "AP", "INP"):
        np.testing.assert_allclose(got.per_query[key], ref[key], rtol=0, atol=1e-9, err_msg=key)
    assert got.mAP == pytest.approx(np.nanmean(got.per_query["AP"]), abs=1e-12)


def test_chunking_does_not_change_results(monkeypatch):
    import reidcli.retrieval.evaluate as ev

    query, gallery = _splits(4, num_query=50, num_gallery=300)
    a = evaluate(query, gallery, EvalConfig(engine="torch"))
    assert ev._chunk_rows(300, 0) > 50 and ev._chunk_rows(300, 1) == 873  # auto: 1 GiB of scores on the CPU
    monkeypatch.setattr(ev, "_chunk_rows", lambda *a: 1)
    b = evaluate(query, gallery, EvalConfig(engine="torch"))  # one query per chunk
    assert a.metrics.cmc == b.metrics.cmc
    assert a.metrics.mAP == pytest.approx(b.metrics.mAP, abs=1e-12)
    assert a.metrics.mINP == pytest.approx(b.metrics.mINP, abs=1e-12)


def test_chance_map_matches_random_rankings():
    query, gallery = _splits(5, num_query=40, num_gallery=200)
    chance = evaluate(query, gallery, EvalConfig(engine="torch")).metrics.chance_mAP
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(60):
        s = rng.random((len(query), len(gallery))).astype(np.float32)
        maps.append(_eval_scores(s, query.pids, query.camids, gallery.pids, gallery.camids).mAP)
    assert abs(np.mean(maps) - chance) < 0.01


def test_no_valid_query_is_an_error():
    query, gallery = _splits(6)
    gallery = FeatureSplit(gallery.feats, gallery.pids + 1000, gallery.camids)
    with pytest.raises(FormatError, match="no query has a matching gallery item"):
        evaluate(query, gallery, EvalConfig(engine="torch"))


def test_mismatched_dimensions():
    query, gallery = _splits(6)
    with pytest.raises(FormatError, match="16-d"):
        evaluate(FeatureSplit(query.feats[:, :8], query.pids, query.camids), gallery, EvalConfig())


@pytest.mark.parametrize("seed", [0, 3])
def test_sorted_keys_and_counting_give_identical_ranks(seed):
    """The GPU's method equals the CPU's rank for rank, on mixed good and bad queries with ±0 and duplicates."""
    rng = np.random.default_rng(seed)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=60, num_gallery=500, noise=0.5)
    q[::3] = rng.normal(size=q[::3].shape)
    g[400:450] = g[0:50]
    scores = torch.as_tensor(np.round(q @ g.T, 2).astype(np.float32))
    scores[0, :7] = -0.0  # equal to +0.0 elsewhere in the row: a tie, broken by gallery row
    scores[0, 7:14] = 0.0
    t = [torch.as_tensor(a) for a in (qp, qc, gp, gc)]
    a = positive_ranks(scores, *t, method="count")
    b = positive_ranks(scores, *t, method="sort")
    c = positive_ranks(scores, *t, method="scan")
    assert torch.equal(a.ranks, b.ranks) and torch.equal(a.num_valid, b.num_valid)
    assert torch.equal(a.ranks, c.ranks) and torch.equal(a.num_valid, c.num_valid)
    assert (a.ranks >= 0).sum() > 100


def test_auto_method_handles_a_collapsed_model_and_blocks_change_nothing():
    """All scores equal (a collapsed model): the tie-heavy rows go to counting; blocks give the same metrics."""
    from reidcli.retrieval.metrics import GalleryGroups, ranks_in_blocks, scan_available

    rng = np.random.default_rng(5)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=30, num_gallery=300)
    t = [torch.as_tensor(a) for a in (qp, qc, gp, gc)]
    flat = torch.zeros(len(qp), len(gp))
    auto, count = (positive_ranks(flat, *t, method=m) for m in ("auto", "count"))
    assert torch.equal(auto.ranks, count.ranks)
    ref = eval_market1501(-flat.numpy().astype(np.float64), qp, gp, qc, gc)
    assert abs(summarize([auto]).mAP - ref[1]) < 1e-6
    big_g = 150_000  # 16 MiB blocks: 27 rows of 150,000 scores → 30 queries make 2 blocks
    # 1,000 identities: ~150 positives per query (40 gave 3,750, and the torch counting took most of a minute)
    gp_big, gc_big = torch.as_tensor(rng.integers(0, 1000, big_g)), torch.as_tensor(rng.integers(0, 6, big_g))
    scores = torch.as_tensor(rng.normal(size=(len(qp), big_g)).astype(np.float32))
    tb = [t[0], t[1], gp_big, gc_big]
    whole = summarize([positive_ranks(scores, *tb, method="count")])
    groups = GalleryGroups(gp_big, gc_big)
    blocks = ranks_in_blocks(scores, *tb, groups=groups, method="count")  # the torch counting goes by blocks
    assert len(blocks) == 2 and summarize(blocks).mAP == pytest.approx(whole.mAP, abs=1e-12)
    scanned = ranks_in_blocks(scores, *tb, groups=groups)  # the scan (where built) takes the chunk whole
    assert len(scanned) == (1 if scan_available() else 2)
    assert summarize(scanned).mAP == pytest.approx(whole.mAP, abs=1e-12)


def test_kernel_failure_falls_back_to_torch_with_one_warning(monkeypatch):
    """A GPU whose Triton cannot build the kernel still gets exact ranks: a warning, then the torch methods."""
    import reidcli.retrieval.metrics as metrics

    pytest.importorskip("triton")
    monkeypatch.setattr(metrics, "_KERNEL_FAILED", [])
    rng = np.random.default_rng(1)
    q, qp, qc, g, gp, gc = market_like(rng)
    t = [torch.as_tensor(a) for a in (q @ g.T, qp, qc, gp, gc)]
    groups = metrics.GalleryGroups(t[3], t[4])
    with pytest.warns(UserWarning, match="Triton ranking kernel failed"):
        assert metrics._kernel_ranks(t[0], groups, t[1], t[2], strict=False) is None
    assert metrics._KERNEL_FAILED and not metrics._kernel_usable()  # not tried again in this process
    with pytest.raises(Exception):  # noqa: B017 (the strict call re-raises whatever Triton raised)
        metrics._kernel_ranks(t[0], groups, t[1], t[2], strict=True)


def test_kernel_counting_on_cpu_is_refused_clearly():
    from reidcli.errors import ConfigError

    query, gallery = _splits(6)
    with pytest.raises(ConfigError, match="runs on a CUDA GPU"):
        evaluate(query, gallery, EvalConfig(engine="torch", device="cpu", counting="kernel"))
    with pytest.raises(ConfigError, match="unknown counting method"):
        evaluate(query, gallery, EvalConfig(engine="torch", counting="fast"))


def test_float16_similarity_equals_the_upcast_product():
    """float16 features: the scores are the float32 products of the stored values, whichever way they are made."""
    from reidcli.retrieval.similarity import Similarity, similarity

    rng = np.random.default_rng(2)
    a = torch.as_tensor(rng.normal(size=(7, 32)).astype(np.float16))
    b = torch.as_tensor(rng.normal(size=(11, 32)).astype(np.float16))
    s = Similarity(b, "fp16")(a)
    assert s.dtype == torch.float32 and torch.equal(s, a.float() @ b.float().T)
    # the CPU: fp32 (oneDNN), the same products summed in another order
    torch.testing.assert_close(similarity(a.float(), b.float()), s, rtol=0, atol=1e-5)


@pytest.mark.parametrize("way", ["onednn", "mkldnn", "mm"])
def test_cpu_fp32_scores_equal_float64_to_a_gemms_rounding_every_way(monkeypatch, way):
    """Each way the CPU multiplies (oneDNN's operator, the mkldnn layout, torch.mm) against float64; only torch.mm
    writes into ``out``. Here the first way is picked: torch's x86 wheels carry oneDNN."""
    import reidcli.retrieval.similarity as sim

    assert sim.cpu_gemm_way() == "onednn"
    monkeypatch.setattr(sim, "cpu_gemm_way", lambda: way)
    rng = np.random.default_rng(3)
    a = torch.as_tensor(rng.normal(size=(300, 96)).astype(np.float32))
    b = torch.as_tensor(rng.normal(size=(500, 96)).astype(np.float32))
    exact = a.double() @ b.double().T
    s = sim.Similarity(b, "fp32")
    assert s.cpu.way == way and s.takes_out == (way == "mm")
    out = torch.empty(300, 500)
    got = s(a, out)
    assert got.dtype == torch.float32 and got.shape == (300, 500) and got.is_contiguous()
    assert float((got - exact).abs().max()) <= 4 * float((a @ b.T - exact).abs().max()) + 1e-6
    assert (got.data_ptr() == out.data_ptr()) == (way == "mm")
    assert s(a[:0]).shape == (0, 500)
    torch.testing.assert_close(sim.matmul_t(a, b), got, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spread", [0.0, 12.0])
def test_split_float16_scores_are_as_accurate_as_an_fp32_gemm(spread):
    """The GPU's split (x = hi + lo/2¹¹, three fp16 products with fp32 accumulation) against float64, with the
    accumulation emulated exactly and as fp32: never worse than the fp32 GEMM itself, also for features whose
    components span many decades (``spread``: e-folds), where lo would underflow without its 2¹¹ scale."""
    from reidcli.retrieval.similarity import Similarity

    rng = np.random.default_rng(3)

    def unit(n):
        x = rng.normal(size=(n, 256)) * np.exp(rng.uniform(-spread, 0, size=(1, 256)))
        return torch.as_tensor((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))

    q, g = unit(60), unit(400)
    exact = q.double() @ g.double().T
    fp32_err = float((q @ g.T - exact).abs().max())
    tensor_cores = lambda a, b: (a.double() @ b.double().T).float()  # noqa: E731 — exact products, one rounding
    split = Similarity(g, "split", mm=tensor_cores)(q)
    assert split.dtype == torch.float32 and float((split - exact).abs().max()) <= fp32_err
    assert float((Similarity(g, "split")(q) - exact).abs().max()) <= 2 * fp32_err  # fp32 accumulation, as cuBLAS


def test_similarity_mode_choice_on_the_cpu_is_fp32():
    from reidcli.retrieval.similarity import Similarity, choose_mode

    x = torch.rand(3, 8)
    assert choose_mode(x, x) == choose_mode(x, x, "split") == choose_mode(x.half(), x.half()) == "fp32"
    with pytest.raises(ValueError, match="unknown similarity mode"):
        Similarity(x, "int8")
    with pytest.raises(ConfigError, match="unknown similarity mode"):
        EvalConfig(similarity="tf32").validate()


def test_kernel_declines_groups_wider_than_it_takes(monkeypatch):
    """A pid with more gallery items than the kernel's width goes to the torch methods, with no warning."""
    import warnings

    import reidcli.retrieval.metrics as metrics

    pytest.importorskip("triton")
    from reidcli.retrieval.rank_kernel import MAX_SAME

    monkeypatch.setattr(metrics, "_KERNEL_FAILED", [])
    gp = torch.ones(MAX_SAME + 1, dtype=torch.long)
    gc = torch.arange(MAX_SAME + 1) % 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = metrics._kernel_ranks(torch.zeros(2, len(gp)), metrics.GalleryGroups(gp, gc), gp[:2], gc[:2], False)
    assert out is None and not metrics._KERNEL_FAILED


def test_similarity_mode_choice_where_tensor_cores_multiply_half_into_float(monkeypatch):
    """The decision a GPU makes: the split for unit features, fp32 when a component exceeds 1 (fp16 could
    overflow), fp16 for float16 files, and whatever is asked for explicitly."""
    import reidcli.retrieval.similarity as sim

    monkeypatch.setattr(sim, "_tensor_cores", lambda x: True)
    unit = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    assert sim.choose_mode(unit, unit) == "split" and sim.choose_mode(unit, 3 * unit) == "fp32"
    assert sim.choose_mode(unit.half(), unit.half()) == "fp16" and sim.choose_mode(unit, unit, "fp32") == "fp32"
    assert sim.choose_mode(unit, 3 * unit, "split") == "split" and sim.choose_mode(unit[:0], unit) == "fp32"


@pytest.mark.parametrize("share", [0.0, 0.02, 0.06, 0.09, 0.3, 1.0])
def test_flat_nonzero_equals_torch_at_every_density(share):
    """numpy's sparse loop below 3%, its branch-free one behind a padded tail above: the same indices as torch."""
    from reidcli.retrieval.metrics import _count_true, _flat_nonzero

    rng = np.random.default_rng(1)
    mask = torch.as_tensor(rng.random((40, 301)) < share)
    for m in (mask, mask[:, ::2]):  # contiguous and a strided view
        got = _flat_nonzero(m, _count_true(m))
        assert _count_true(m) == int(m.sum())
        assert torch.equal(got, m.reshape(-1).nonzero()[:, 0])


@pytest.mark.parametrize("dense_share", [0.0, 2.0])  # every weak positive counted in place / none
def test_counting_in_place_and_by_search_agree_with_ties_at_every_level(monkeypatch, dense_share):
    """Weak queries (positives far down) with exact ties everywhere: a negative equal to the weakest positive
    before it in the gallery, two equal positives, ±0, duplicates; ranks equal the sort method's and the
    reference's, whichever positives are counted by comparison passes."""
    import reidcli.retrieval.metrics as metrics

    monkeypatch.setattr(metrics, "_DENSE_SHARE", dense_share)
    rng = np.random.default_rng(4)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=50, num_gallery=400, noise=1.5)
    g[300:340] = g[0:40]
    scores = np.round(q @ g.T, 2).astype(np.float32)
    for row in range(1, 20):  # tie a negative placed first in the gallery to the row's weakest positive
        pos = np.flatnonzero((gp == qp[row]) & (gc != qc[row]))
        neg = np.flatnonzero(gp != qp[row])
        if len(pos) >= 2:
            weakest = pos[np.argmin(scores[row, pos])]
            scores[row, neg[0]] = scores[row, weakest]
            scores[row, pos[-1]] = scores[row, weakest] if row % 2 else scores[row, pos[-1]]  # equal positives
    scores[2, :9] = -0.0
    scores[2, 9:18] = 0.0
    t = [torch.as_tensor(a) for a in (scores, qp, qc, gp, gc)]
    a = positive_ranks(*t, method="count")
    b = positive_ranks(*t, method="sort")
    c = positive_ranks(*t, method="scan")
    assert torch.equal(a.ranks, b.ranks) and torch.equal(a.ranks, c.ranks) and (a.ranks >= 0).sum() > 200
    _, mAP, mINP, _ = eval_market1501(-scores.astype(np.float64), qp, gp, qc, gc)
    m = summarize([a])
    assert abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6


def test_scan_is_built_wherever_a_c_compiler_is():
    """The install compiles the CPU scan; only a machine without a C compiler may run the torch counting."""
    import shutil

    from reidcli.retrieval.metrics import scan_available

    assert scan_available() or not (shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.parametrize("seed", [0, 1])
def test_scan_on_distances_with_many_positives_equals_the_torch_counting(seed):
    """Distances read as they are (no negated copy); rows with up to 40 positives (five groups of eight, the last
    partial), positives in the gallery's first and last rows, rows without positives, equal distances and ±0;
    enough rows for both threads."""
    from reidcli.retrieval.metrics import GalleryGroups, ranks_in_blocks

    rng = np.random.default_rng(seed)
    nq, ng = 64, 700
    gp, gc = rng.integers(0, 18, ng), rng.integers(0, 6, ng)
    qp, qc = rng.integers(0, 20, nq), rng.integers(0, 6, nq)  # pids 18, 19: no match
    gp[0], gc[0], gp[-1], gc[-1] = qp[0], (qc[0] + 1) % 6, qp[0], (qc[0] + 2) % 6
    dist = np.round(rng.random((nq, ng)), 2).astype(np.float32)
    dist[1, :50] = 0.0
    dist[1, 50:100] = -0.0
    t = [torch.as_tensor(a) for a in (qp, qc, gp, gc)]
    groups = GalleryGroups(t[2], t[3])
    d = torch.as_tensor(dist)
    scan = ranks_in_blocks(d, *t, groups=groups, distances=True, method="scan")
    count = ranks_in_blocks(-d, *t, groups=groups, method="count")
    assert all(torch.equal(a.ranks, b.ranks) for a, b in zip(scan, count, strict=True))
    assert max(int(p.num_pos.max()) for p in scan) > 32 and min(int(p.num_pos.min()) for p in scan) == 0
    _, mAP, mINP, _ = eval_market1501(dist.astype(np.float64), qp, gp, qc, gc)
    m = summarize(scan)
    assert abs(m.mAP - mAP) < 1e-6 and abs(m.mINP - mINP) < 1e-6


def test_auto_counts_by_the_scan_on_the_cpu_where_it_is_built(monkeypatch):
    import reidcli.retrieval.metrics as metrics

    monkeypatch.setattr(metrics.native, "module", lambda: object())  # built or not: only the choice is tested
    scores = torch.zeros(2, 10)
    assert metrics._use_scan("auto", scores) and metrics._use_scan("scan", scores)
    assert not metrics._use_scan("count", scores) and not metrics._use_scan("sort", scores)
    monkeypatch.setattr(metrics.native, "module", lambda: None)
    assert not metrics._use_scan("auto", scores)
    with pytest.raises(ValueError, match="compiled module"):
        metrics._use_scan("scan", scores)


def test_scan_counting_without_the_compiled_module_is_refused_clearly(monkeypatch):
    import reidcli.retrieval.metrics as metrics

    monkeypatch.setattr(metrics.native, "module", lambda: None)
    query, gallery = _splits(6)
    with pytest.raises(ConfigError, match="not built"):
        evaluate(query, gallery, EvalConfig(engine="torch", device="cpu", counting="scan"))
    auto = evaluate(query, gallery, EvalConfig(engine="torch", device="cpu")).metrics  # the torch counting
    assert auto.num_valid_queries > 0


def test_an_out_of_date_compiled_module_is_ignored_with_one_warning(monkeypatch):
    """A build from older source (a pull without reinstalling) must not be called with new arguments."""
    import warnings

    from reidcli.retrieval import _cpu, native

    assert native.module() is _cpu and _cpu.ABI == native.ABI
    monkeypatch.setattr(native, "_STALE", [])
    monkeypatch.setattr(_cpu, "ABI", native.ABI - 1)
    with pytest.warns(UserWarning, match="out of date"):
        assert native.module() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.module() is None and not native.available()
    assert not caught  # warned once per process
    query, gallery = _splits(6)
    assert evaluate(query, gallery, EvalConfig(engine="torch", device="cpu")).metrics.num_valid_queries > 0


def test_kernel_thread_pool_is_made_anew_in_another_process(monkeypatch):
    """A forked child inherits the pool object but none of its threads: the pool remembers its process and a call
    from another pid makes a new one (torch's own OpenMP threads after a fork are torch's matter)."""
    from reidcli.retrieval import native

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seen = []
    native.over_rows(40, lambda r0, r1: seen.append((r0, r1)))
    first = native._POOL[0]
    assert sorted(seen) == [(0, 20), (20, 40)] and first[0] == os.getpid()
    native.over_rows(40, lambda r0, r1: None)
    assert native._POOL[0] is first  # reused within the process
    monkeypatch.setattr(native.os, "getpid", lambda: first[0] + 1)
    seen.clear()
    native.over_rows(40, lambda r0, r1: seen.append((r0, r1)))
    assert native._POOL[0] is not first and native._POOL[0][0] == first[0] + 1 and len(seen) == 2


def test_picture_lists_keep_gallery_order_for_equal_scores():
    from reidcli.retrieval.evaluate import ranked_lists

    g = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (40, 1))
    g[7] = [1.0, 0.0]  # the one best item
    ids = np.arange(40)
    query = FeatureSplit(np.array([[1.0, 0.0]], dtype=np.float32), ids[:1], ids[:1])
    lists = ranked_lists(query, FeatureSplit(g, ids, ids), 6)
    assert lists.tolist() == [[7, 0, 1, 2, 3, 4]]


def test_cmc_stops_at_the_gallery_size():
    """As torchreid: a CMC longer than the gallery only repeats its last value, so it stops at the gallery's size
    (`--max-rank 100000` on 1,241 gallery images printed 100,000 values)."""
    rng = np.random.default_rng(4)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=20, num_gallery=30)
    for engine in ("faiss", "torch"):
        out = evaluate(FeatureSplit(q, qp, qc), FeatureSplit(g, gp, gc), EvalConfig(engine=engine, max_rank=50))
        cmc, mAP, _, _ = eval_market1501(-(q @ g.T).astype(np.float64), qp, gp, qc, gc, max_rank=30)
        assert len(out.metrics.cmc) == 30 and out.metrics.cmc[-1] == 1.0
        np.testing.assert_allclose(out.metrics.cmc, cmc, atol=1e-9)
        assert abs(out.metrics.mAP - mAP) < 1e-6
