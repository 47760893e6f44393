"""``reid search``: new query images embedded by the gallery's own weights and searched in the saved index."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reidcli.errors import ConfigError, ReidError
from reidcli.retrieval.search import query_files, resolve_recorded, search_images
from tests.conftest import run_cli, run_cli_here, train_tiny_run


@pytest.fixture(scope="module")
def indexed(tiny_data, both_run):
    """A trained run, its features, a flat index over the gallery, and three query images written as PNG."""
    root, run = both_run
    r = run_cli("index", str(root / "f.h5"), "--out", str(root / "g.faiss"))
    assert r.returncode == 0, r.stderr
    rows = [0, 7, 15]
    with h5py.File(tiny_data) as f:
        images = f["query/images"][rows]
    (root / "queries").mkdir()
    for row, image in zip(rows, images, strict=True):
        Image.fromarray(image).save(root / "queries" / f"q{row:02d}.png")  # lossless, at the model's size
    return root, run, rows


def test_a_query_image_gets_the_ranked_list_of_its_extracted_features(indexed, tiny_data):
    root, _, rows = indexed
    out = root / "out"
    r = run_cli("search", str(root / "queries"), "--index", str(root / "g.faiss"), "--top-k", "5", "--out", str(out),
                "--json", "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["exact"] and [q["query"] for q in res["queries"]] == [
        str(root / "queries" / f"q{i:02d}.png") for i in rows
    ]
    with h5py.File(root / "f.h5") as f:
        q, g = f["query/feats"][:], f["gallery/feats"][:]
        pids, paths = f["gallery/pids"][:], [p.decode() for p in f["gallery/paths"][:]]
    for row, entry in zip(rows, res["queries"], strict=True):
        scores = g @ q[row]
        expected = np.argsort(-scores, kind="stable")[:5]
        got = [h["row"] for h in entry["results"]]
        assert got == expected.tolist()  # the same image, model and flip: the same list as the features file's
        np.testing.assert_allclose([h["score"] for h in entry["results"]], scores[expected], atol=1e-5)
        assert [h["pid"] for h in entry["results"]] == pids[expected].tolist()
        assert [h["path"] for h in entry["results"]] == [paths[i] for i in expected]
    table = pd.read_csv(out / "search.csv")
    assert len(table) == 15 and table["rank"].tolist() == [1, 2, 3, 4, 5] * 3
    assert res["pictures"] == [str(out / "search.png")] and Image.open(out / "search.png").size[0] > 300


def test_images_of_another_size_are_resized_as_prepare_does(indexed):
    root, _, _ = indexed
    big = Image.open(root / "queries" / "q00.png").resize((48, 96))
    big.convert("RGB").save(root / "big.jpg")
    r = run_cli_here("search", str(root / "big.jpg"), "--index", str(root / "g.faiss"), "--json", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(r.stdout)["queries"]
    assert [h["rank"] for h in entry["results"]] == [1, 2, 3] and entry["results"][0]["score"] > 0.5


def test_queries_are_resized_with_the_filter_the_gallery_was_prepared_with(indexed):
    """A gallery prepared with ``--resize bilinear`` (recorded by extract in the features file): new query images
    are resized with the same filter, not the default bicubic."""
    from reidcli.data.prepare import decode_image

    root, _, _ = indexed
    Image.open(root / "queries" / "q07.png").resize((40, 90)).save(root / "odd.png")
    with h5py.File(root / "f.h5") as f:
        assert f.attrs["resize"] == "bicubic"  # what the tiny dataset was prepared with
    shutil.copy(root / "f.h5", root / "f_bilinear.h5")
    with h5py.File(root / "f_bilinear.h5", "a") as f:
        f.attrs["resize"] = "bilinear"
    data = (root / "odd.png").read_bytes()
    for features, resize in ((root / "f.h5", "bicubic"), (root / "f_bilinear.h5", "bilinear")):
        found = search_images(root / "g.faiss", [root / "odd.png"], top_k=1, device="cpu", features=features)
        np.testing.assert_array_equal(found.images[0], decode_image(data, (64, 32), "odd.png", resize=resize))
    assert not np.array_equal(*(decode_image(data, (64, 32), "q", resize=r) for r in ("bicubic", "bilinear")))


def test_an_ivfpq_index_is_searched_and_reported_approximate(indexed):
    """IVF-PQ trains on 256 vectors or more: the gallery padded with random unit rows (labelled distractors)."""
    from reidcli.retrieval.features import FeatureSplit, read_features, write_features

    root, _, _ = indexed
    attrs, splits = read_features(root / "f.h5")
    g = splits["gallery"]
    extra = np.random.default_rng(0).standard_normal((300, g.feats.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    padded = FeatureSplit(
        np.concatenate([g.feats, extra]),
        np.concatenate([g.pids, np.zeros(300, np.int64)]),
        np.concatenate([g.camids, np.zeros(300, np.int64)]),
        g.paths + [f"extra/{i}.jpg" for i in range(300)],
    )
    write_features(root / "big.h5", {"query": splits["query"], "gallery": padded}, dict(attrs))
    r = run_cli("index", str(root / "big.h5"), "--out", str(root / "pq.faiss"), "--kind", "ivfpq", "--nlist", "2",
                "--m", "4", "--nprobe", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli_here("search", str(root / "queries" / "q00.png"), "--index", str(root / "pq.faiss"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["exact"] is False and len(res["queries"][0]["results"]) == 10


def test_search_refuses_other_weights_missing_files_and_non_images(indexed, tiny_data, tmp_path):
    root, run, _ = indexed
    other = train_tiny_run(tiny_data, tmp_path / "other", "ape", "--device", "cpu")
    query = str(root / "queries" / "q00.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("g.faiss", "g.faiss.json"):
        shutil.copy(root / name, moved / name)
    meta = json.loads((moved / "g.faiss.json").read_text())
    meta["features"] = "elsewhere/f.h5"  # recorded relative to where 'reid index' ran
    (moved / "g.faiss.json").write_text(json.dumps(meta))
    index = root / "g.faiss"
    cases = [
        ((query,), {"run": other}, "is not the weights the gallery in"),
        ((str(tmp_path / "notes.txt"),), {}, "cannot be decoded (not in an image format PIL reads); pass image files"),
        ((str(tmp_path / "empty"),), {}, "holds no images"),
        ((str(tmp_path / "none.png"),), {}, "query image"),
        ((query,), {"index_path": tmp_path / "none.faiss"}, "not found; build it with 'reid index'"),
        ((query,), {"index_path": moved / "g.faiss"}, f"that {moved / 'g.faiss'} records is not found"),
        ((query,), {"images_from": _other_dataset(tmp_path)}, "does not hold the gallery images of"),
        ((query,), {"top_k": 0}, "--top-k must be at least 1"),
        ((query,), {"precision": "fp8"}, "unknown --precision 'fp8'"),
        ((query,), {"camid": 0}, "--camid has no effect: "),  # the model has no camera embeddings
    ]
    for images, kwargs, message in cases:
        with pytest.raises(ReidError) as e:
            search_images(**{"index_path": index, "images": [Path(p) for p in images], **kwargs})
        assert message in str(e.value), (images, kwargs, e.value)
    # on the command line: one line, exit 1; an option without its effect is refused before any work
    r = run_cli_here("search", query, "--index", str(index), "--data", str(tiny_data))
    assert (
        r.returncode == 1
        and r.stderr.strip() == "Error: --data has no effect without --out; leave it out or add --out DIR"
    )
    # the features file beside the index is found even when the recorded path is not
    shutil.copy(root / "f.h5", moved / "f.h5")
    found = search_images(moved / "g.faiss", [Path(query)], top_k=2, device="cpu")
    assert found.features == moved / "f.h5" and found.rows.shape == (1, 2) and found.checked


def _other_dataset(tmp_path: Path) -> Path:
    from reidcli.data.prepare import PrepareConfig, prepare_dataset
    from reidcli.data.synthetic import SyntheticConfig, generate_synthetic

    config = SyntheticConfig(
        num_train_ids=2, num_test_ids=2, num_distractors=1, num_junk=0, images_per_camera=1, seed=9
    )
    generate_synthetic(tmp_path / "raw", config)
    prepare_dataset(
        PrepareConfig(dataset="synthetic", root=tmp_path / "raw", out=tmp_path / "o.h5", image_size=(64, 32))
    )
    return tmp_path / "o.h5"


def test_query_files_expand_folders_in_order_once(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/2.jpg", "a/1.PNG", "a/readme.md", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    got = query_files([tmp_path / "b.png", tmp_path / "a", tmp_path / "a" / "2.jpg"])
    assert got == [tmp_path / "b.png", tmp_path / "a" / "1.PNG", tmp_path / "a" / "2.jpg"]
    assert resolve_recorded("somewhere/else/b.png", tmp_path / "x.json", "file", "--f") == tmp_path / "b.png"
    with pytest.raises(ConfigError, match="does not record its run; pass --run"):
        resolve_recorded("", tmp_path / "x.json", "run", "--run")
