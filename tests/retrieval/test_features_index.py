import h5py
import numpy as np
import pytest

from reidcli.errors import ConfigError, FormatError
from reidcli.retrieval.evaluate import EvalConfig, evaluate
from reidcli.retrieval.features import FeatureSplit, read_features, write_features
from reidcli.retrieval.index import IndexConfig, build_index, index_meta, load_index, save_index, search
from tests.retrieval.reference import market_like


@pytest.fixture()
def feats(tmp_path):
    rng = np.random.default_rng(0)
    q, qp, qc, g, gp, gc = market_like(rng, num_query=30, num_gallery=600, dim=32)
    path = tmp_path / "f.h5"
    write_features(
        path,
        {
            "query": FeatureSplit(q.astype(np.float16), qp, qc, [f"q{i}" for i in range(len(qp))]),
            "gallery": FeatureSplit(g, gp, gc),
        },
        {"dataset": "test", "model_config": {"pe": "ape"}},
    )
    return path


def test_round_trip(feats):
    attrs, s = read_features(feats)
    assert attrs["format"] == "reidcli.features" and attrs["dataset"] == "test"
    assert '"pe": "ape"' in attrs["model_config"]
    assert s["query"].feats.dtype == np.float16 and s["query"].paths[1] == "q1"
    assert s["gallery"].feats.shape == (600, 32)


def _edit(path, fn):
    with h5py.File(path, "a") as h5:
        fn(h5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.attrs.__setitem__("format", "other"), "not a reidcli features file"),
        (lambda h: h.attrs.__setitem__("version", 7), "version 7"),
        (lambda h: h.__delitem__("gallery"), "no 'gallery' group"),
        (lambda h: h["gallery"].__delitem__("camids"), "lacks camids"),
        (
            lambda h: (
                h["gallery"].__delitem__("pids"),
                h["gallery"].create_dataset("pids", data=np.zeros(5, np.int64)),
            ),
            "600 features but 5 pids",
        ),
        (lambda h: h["gallery/feats"].__setitem__((3, 0), np.nan), "NaN or Inf"),
        (
            lambda h: (
                h["query"].__delitem__("feats"),
                h["query"].create_dataset("feats", data=np.ones((30, 8), np.float32)),
            ),
            "dimensions differ",
        ),
    ],
)
def test_bad_features_files(feats, edit, message):
    _edit(feats, edit)
    with pytest.raises(FormatError, match=message):
        read_features(feats)


def test_rows_a_writer_did_not_normalise_are_normalised_on_read_and_named_once(feats, tmp_path):
    """The format stores unit rows and ranks by cosine: a file whose rows are scaled (another tool's raw features)
    evaluates as its normalised rows would, not by inner product, and every command reading it says so; unit rows
    (float16 rounding included) are read as they are; an all-zero row, which no cosine ranks, is refused."""
    from reidcli.retrieval.features import renormalised_notice
    from tests.conftest import run_cli_here

    _, unit = read_features(feats)
    assert unit["query"].renormalised == unit["gallery"].renormalised == 0
    rng = np.random.default_rng(1)
    scale = {"query": rng.uniform(0.5, 3, (30, 1)), "gallery": np.ones((600, 1))}
    scale["gallery"][::7] = 4.0  # every 7th gallery row: 86 rows
    scaled = tmp_path / "scaled.h5"
    write_features(
        scaled,
        {
            n: FeatureSplit((s.feats.astype(np.float32) * scale[n]).astype(np.float32), s.pids, s.camids)
            for n, s in unit.items()
        },
    )
    _, back = read_features(scaled)
    assert (back["query"].renormalised, back["gallery"].renormalised) == (30, 86)
    assert np.allclose(np.linalg.norm(back["gallery"].feats, axis=1), 1, atol=1e-6)
    notice = renormalised_notice(scaled, back)
    assert notice == (
        f"notice: {scaled}: 30 of 30 query and 86 of 600 gallery feature rows are not unit length (norms "
        f"{back['query'].norm_range[0]:.3g}–4); they are used L2-normalised (cosine similarity, as the features format "
        "defines)"
    )
    assert renormalised_notice(feats, unit) is None and notice.endswith(renormalised_notice(None, back))
    r = run_cli_here("doctor", "--features", str(scaled))  # a note, not a failure: the reader handles it
    assert r.returncode == 0 and "features rows" in r.stdout and "note" in r.stdout, r.stdout
    plain = evaluate(unit["query"], unit["gallery"], EvalConfig(engine="torch")).metrics
    assert evaluate(back["query"], back["gallery"], EvalConfig(engine="torch")).metrics.mAP == pytest.approx(
        plain.mAP, abs=1e-6
    )
    r = run_cli_here("evaluate", str(scaled), "--json")
    assert r.returncode == 0 and "are not unit length" in r.stderr, r.stderr
    import json

    assert json.loads(r.stdout)["mAP"] == pytest.approx(plain.mAP, abs=1e-6)
    _edit(scaled, lambda h: h["gallery/feats"].__setitem__(3, np.zeros(32, np.float32)))
    with pytest.raises(FormatError, match="1 gallery feature row.s. are all zero, which no cosine similarity can rank"):
        read_features(scaled)


def test_truncated_file(feats, tmp_path):
    data = feats.read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match="not a readable HDF5"):
        read_features(tmp_path / "t.h5")


def test_flat_index_equals_brute_force_and_reloads(feats, tmp_path):
    _, s = read_features(feats)
    g, q = s["gallery"], s["query"]
    index = build_index(g.feats, IndexConfig(kind="flat"))
    scores, rows = search(index, q.feats, 10)
    brute = q.feats.astype(np.float32) @ g.feats.T
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :10], atol=1e-5)
    path = tmp_path / "g.faiss"
    save_index(index, path, index_meta(IndexConfig(), str(feats), "gallery", g.feats, g.pids))
    again, meta = load_index(path, g.feats, g.pids)
    assert meta["exact"] and again.ntotal == 600
    # the reloaded index's own vectors are searched: the same metrics as the torch engine
    by_index = evaluate(q, g, EvalConfig(engine="faiss", depth=5), again).metrics
    by_torch = evaluate(q, g, EvalConfig(engine="torch")).metrics
    assert by_index.mAP == pytest.approx(by_torch.mAP, abs=1e-6) and by_index.cmc == pytest.approx(by_torch.cmc)
    half = FeatureSplit(g.feats[:300], g.pids[:300], g.camids[:300])
    with pytest.raises(FormatError, match="600 vectors of 32 dimensions but the gallery 300"):
        evaluate(q, half, EvalConfig(engine="faiss"), again)
    with pytest.raises(FormatError, match="other features"):
        load_index(path, g.feats[::-1].copy(), g.pids)
    with pytest.raises(FormatError, match="600×32"):
        load_index(path, g.feats[:10], g.pids[:10])
    other = build_index(g.feats[::-1].copy(), IndexConfig(kind="flat"))
    import faiss

    faiss.write_index(other, str(path))  # an index file replaced without its .json (an interrupted rebuild)
    with pytest.raises(FormatError, match="do not belong together"):
        load_index(path, g.feats, g.pids)


def test_ivfpq_is_reported_approximate(feats):
    _, s = read_features(feats)
    index = build_index(s["gallery"].feats, IndexConfig(kind="ivfpq", nlist=4, m=8, nbits=4, nprobe=4))
    out = evaluate(s["query"], s["gallery"], EvalConfig(engine="faiss"), index)
    assert out.metrics.approximate and out.engine == "faiss-approx"
    exact = evaluate(s["query"], s["gallery"], EvalConfig(engine="torch")).metrics.mAP
    assert abs(out.metrics.mAP - exact) < 0.2


def test_bad_index_options(feats):
    _, s = read_features(feats)
    with pytest.raises(ConfigError, match="must divide"):
        build_index(s["gallery"].feats, IndexConfig(kind="ivfpq", m=5))
    with pytest.raises(ConfigError, match="unknown index kind"):
        build_index(s["gallery"].feats, IndexConfig(kind="hnsw"))
    for bad in ({"m": 0}, {"nprobe": 0}, {"nlist": -1}):  # --m 0 was a ZeroDivisionError
        with pytest.raises(ConfigError, match="--m and --nprobe must be at least 1"):
            build_index(s["gallery"].feats, IndexConfig(kind="ivfpq", **bad))


def _cli_error(*args) -> str:
    from tests.conftest import run_cli_here

    r = run_cli_here(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or r.stderr.startswith("notice"), r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_output_paths_of_the_wrong_kind_fail_before_any_work(feats, tmp_path):
    """A file output named by a folder, a folder output under a file, a negative picture count: one line, exit 1,
    nothing written (evaluation would take minutes at scale; the check comes first)."""
    folder = tmp_path / "somewhere"
    folder.mkdir()
    message = _cli_error("index", str(feats), "--out", str(folder))
    assert "is a folder; pass the path of a file to write, e.g." in message
    assert list(folder.iterdir()) == []
    message = _cli_error("evaluate", str(feats), "--out", str(feats / "results"))
    assert f"{feats} is a file, not a folder" in message
    message = _cli_error("evaluate", str(feats), "--out", str(tmp_path / "r"), "--visualize", "-1")
    assert "--visualize -1" in message and not (tmp_path / "r").exists()
    message = _cli_error("evaluate", str(feats), "--out", str(tmp_path / "r"), "--visualize", "2")
    assert "--visualize needs the dataset images: pass --data" in message and not (tmp_path / "r").exists()
    # an unwritable place: the system's reason and the path, not a temporary file's name
    message = _cli_error("index", str(feats), "--out", "/proc/reidcli-test.faiss")
    assert message.startswith("Error: cannot write /proc/reidcli-test.faiss:") and ".tmp" not in message


def test_ivfpq_on_few_vectors_says_so_once(feats, tmp_path):
    """600 vectors for 256 PQ centroids: FAISS's own warning came once per sub-quantiser (8 lines here, 64 with
    --m 64); one notice of ours replaces them, and a flat index or enough vectors give none."""
    from tests.conftest import run_cli

    r = run_cli("index", str(feats), "--out", str(tmp_path / "i.faiss"), "--kind", "ivfpq", "--nlist", "4", "--m", "8")
    assert r.returncode == 0, r.stderr
    assert "WARNING clustering" not in r.stderr
    assert " ".join(r.stderr.split()).count("IVF-PQ trained on 600 vectors, fewer than the 9984 FAISS advises") == 1
    assert IndexConfig(kind="ivfpq", nlist=4, m=8).sparse_training(9984) is None
    assert IndexConfig(kind="ivfpq", nlist=1024, m=8).sparse_training(20_000).startswith("IVF-PQ trained on 20000")
    assert IndexConfig().sparse_training(10) is None
