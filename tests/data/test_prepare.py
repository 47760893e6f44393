import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from reidcli.data.prepare import PrepareConfig, prepare_dataset
from reidcli.data.store import read_dataset
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic
from reidcli.errors import ConfigError, DataError, FormatError
from tests.conftest import run_cli, run_cli_here

SMALL = SyntheticConfig(num_train_ids=4, num_test_ids=4, num_distractors=2, num_junk=2, images_per_camera=1, seed=5)


@pytest.fixture()
def market(tmp_path) -> Path:
    root = tmp_path / "Market-1501-v15.09.15"
    generate_synthetic(root, SMALL)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"junk")  # ignored: not an image
    return root


def _prepare(root, out, **kw):
    return prepare_dataset(PrepareConfig(dataset="market1501", root=root, out=out, image_size=(32, 16), **kw))


def test_folder_round_trip(market, tmp_path):
    out = tmp_path / "m.h5"
    result = _prepare(market, out)
    attrs, splits = read_dataset(out)
    assert attrs["format"] == "reidcli.dataset" and attrs["version"] == 1 and attrs["image_size"] == [32, 16]
    n_gallery = len(list((market / "bounding_box_test").glob("*.jpg")))
    assert len(splits["gallery"]) == n_gallery - 2  # junk (-1) dropped
    assert (splits["gallery"].pids == 0).sum() == 2  # distractors kept
    assert splits["train"].images.shape[1:] == (32, 16, 3) and splits["train"].images.dtype == np.uint8
    assert splits["query"].camids.min() >= 0
    assert all(p.startswith("query/") for p in splits["query"].paths)
    rows = {r["split"]: r for r in result.rows}
    assert rows["train"]["ids"] == 4


def test_zip_and_nested_folder_give_the_same_file(market, tmp_path):
    zpath = tmp_path / "market.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in market.rglob("*"):
            if p.is_file():
                z.write(p, f"Market-1501-v15.09.15/{p.relative_to(market).as_posix()}")
    _prepare(tmp_path, tmp_path / "a.h5")  # the parent folder: finds the nested layout
    _prepare(zpath, tmp_path / "b.h5")
    a, b = read_dataset(tmp_path / "a.h5")[1], read_dataset(tmp_path / "b.h5")[1]
    for s in ("train", "query", "gallery"):
        np.testing.assert_array_equal(a[s].images, b[s].images)
        np.testing.assert_array_equal(a[s].pids, b[s].pids)


def test_zip_with_escaping_member_is_refused(tmp_path):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("../../etc/evil.jpg", b"x")
    with pytest.raises(DataError, match="unsafe member"):
        _prepare(zpath, tmp_path / "x.h5")


def test_grayscale_cmyk_and_png_images_become_rgb(market, tmp_path):
    folder = market / "bounding_box_train"
    first = sorted(folder.glob("*.jpg"))[:3]
    Image.open(first[0]).convert("L").save(first[0], format="JPEG")
    Image.open(first[1]).convert("CMYK").save(first[1], format="JPEG")
    Image.open(first[2]).save(first[2].with_suffix(".png"))
    first[2].unlink()
    _, splits = read_dataset(_prepare(market, tmp_path / "m.h5").out)
    assert splits["train"].images.shape[-1] == 3


def test_unreadable_image_names_file_and_leaves_nothing(market, tmp_path):
    bad = sorted((market / "query").glob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "m.h5"
    with pytest.raises(DataError, match=bad.name):
        _prepare(market, out)
    assert not out.exists() and not list(tmp_path.glob(".m.h5*"))
    result = _prepare(market, out, skip_bad=True)
    assert result.skipped == [f"query/{bad.name}"]
    assert out.exists()


def test_skipped_images_keep_every_other_row_aligned_across_blocks(market, tmp_path, monkeypatch):
    """Written block by block (3 images a block here): a skipped image in the middle shifts the later rows, and the
    images, pids, cameras and paths stay together; the split shrinks to the rows kept."""
    import reidcli.data.prepare as prep

    full = read_dataset(_prepare(market, tmp_path / "full.h5").out)[1]["gallery"]
    monkeypatch.setattr(prep, "BLOCK", 3)
    bad = 4
    (market / full.paths[bad]).write_bytes(b"broken")
    result = _prepare(market, tmp_path / "m.h5", skip_bad=True)
    assert result.skipped == [full.paths[bad]]
    got = read_dataset(result.out)[1]["gallery"]
    keep = np.r_[0:bad, bad + 1 : len(full)]
    assert len(got) == len(full) - 1 and {r["split"]: r["images"] for r in result.rows}["gallery"] == len(got)
    np.testing.assert_array_equal(got.images, full.images[keep])
    np.testing.assert_array_equal(got.pids, full.pids[keep])
    np.testing.assert_array_equal(got.camids, full.camids[keep])
    assert got.paths == [full.paths[i] for i in keep]


def test_decoding_keeps_a_bounded_number_of_images_in_flight():
    """``pool.map`` would submit every image of a split at once and hold each decoded one until its turn."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from reidcli.data.prepare import _in_order

    lock, live, peak = threading.Lock(), [0], [0]

    def work(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return i

    with ThreadPoolExecutor(4) as pool:
        out = []
        for i in _in_order(pool, work, list(range(200)), window=8):
            with lock:
                live[0] -= 1  # the consumer has taken this result
            out.append(i)
    assert out == list(range(200)) and peak[0] <= 8 + 1  # the window, and the one the consumer holds


def _distractors(folder: Path, n: int = 5) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 32), (10 * i, 200, 30)).save(folder / f"0000_c{i % 3 + 1}s9_{i:06d}_00.jpg")
    Image.new("RGB", (16, 32)).save(folder / "-1_c1s9_000999_00.jpg")  # junk: left out, as in the main folders
    (folder / "readme.txt").write_text("not an image")
    return folder


def test_extra_gallery_is_appended_to_the_gallery(market, tmp_path):
    extra = _distractors(tmp_path / "images")
    base = read_dataset(_prepare(market, tmp_path / "base.h5").out)[1]
    out = _prepare(market, tmp_path / "m.h5", extra_gallery=extra).out
    attrs, got = read_dataset(out)
    n = len(base["gallery"])
    assert attrs["extra_gallery"] == str(extra)
    assert len(got["gallery"]) == n + 5 and len(got["query"]) == len(base["query"])
    np.testing.assert_array_equal(got["gallery"].images[:n], base["gallery"].images)
    names = sorted(f"0000_c{i % 3 + 1}s9_{i:06d}_00.jpg" for i in range(5))  # in file-name order
    assert got["gallery"].paths[n:] == [f"images/{name}" for name in names]
    assert list(got["gallery"].pids[n:]) == [0] * 5 and list(got["gallery"].camids[n:]) == [0, 0, 1, 1, 2]
    i = int(names[1][10:16])  # the second one's own colour (each drawn in 10·i, 200, 30)
    assert got["gallery"].images[n + 1, 0, 0].tolist() == pytest.approx([10 * i, 200, 30], abs=8)
    # the same images from a zip: the same file contents, paths under the zip's name
    zpath = tmp_path / "images.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(extra.iterdir()):
            z.write(f, f.name)
    zipped = read_dataset(_prepare(market, tmp_path / "z.h5", extra_gallery=zpath).out)[1]["gallery"]
    np.testing.assert_array_equal(zipped.images, got["gallery"].images)
    assert zipped.paths == got["gallery"].paths
    with zipfile.ZipFile(zpath, "w") as z:  # a zip of the folder itself: images/…, not images/images/…
        for f in sorted(extra.iterdir()):
            z.write(f, f"images/{f.name}")
    assert (
        read_dataset(_prepare(market, tmp_path / "f.h5", extra_gallery=zpath).out)[1]["gallery"].paths == zipped.paths
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda m, t: t / "nope", "neither a folder nor a zip"),
        (lambda m, t: m / "bounding_box_test", "already in the dataset's gallery"),
        (lambda m, t: (t / "empty").mkdir() or t / "empty", "holds no image with a pid"),
        (lambda m, t: _distractors(t / "x") and (t / "x" / "IMG_1.jpg").write_bytes(b"x") and t / "x", "IMG_1.jpg"),
    ],
    ids=["missing", "the-gallery-again", "no-images", "bad-name"],
)
def test_extra_gallery_refusals(market, tmp_path, extra, message):
    out = tmp_path / "m.h5"
    with pytest.raises(DataError, match=message):
        _prepare(market, out, extra_gallery=extra(market, tmp_path))
    assert not out.exists()


def test_resize_filter_matches_the_peers_test_transforms(market, tmp_path):
    """``--resize bilinear`` stores what TransReID's and torchreid's test transform (torchvision's Resize on the PIL
    image) feeds the model; the default bicubic is fast-reid's (``interpolation=3``). Recorded in the file."""
    import torchvision.transforms as T

    bilinear = read_dataset(_prepare(market, tmp_path / "l.h5", resize="bilinear").out)
    bicubic = read_dataset(_prepare(market, tmp_path / "c.h5").out)
    assert bilinear[0]["resize"] == "bilinear" and bicubic[0]["resize"] == "bicubic"
    first = Image.open(market / bilinear[1]["train"].paths[0]).convert("RGB")
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    peer = {m: np.asarray(T.Resize((32, 16), interpolation=mode)(first)) for m, mode in modes.items()}
    np.testing.assert_array_equal(bilinear[1]["train"].images[0], peer["bilinear"])
    np.testing.assert_array_equal(bicubic[1]["train"].images[0], peer["bicubic"])
    assert not np.array_equal(peer["bilinear"], peer["bicubic"])
    with pytest.raises(ConfigError, match="unknown --resize 'nearest'; choose one of bicubic, bilinear"):
        _prepare(market, tmp_path / "n.h5", resize="nearest")


def test_zero_byte_image(market, tmp_path):
    bad = sorted((market / "bounding_box_test").glob("0*.jpg"))[0]
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes"):
        _prepare(market, tmp_path / "m.h5")


def test_failed_prepare_keeps_the_previous_file(market, tmp_path):
    out = tmp_path / "m.h5"
    _prepare(market, out)
    before = out.read_bytes()
    sorted((market / "query").glob("*.jpg"))[0].write_bytes(b"broken")
    with pytest.raises(DataError):
        _prepare(market, out)
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: [p.unlink() for p in (r / "query").glob("*")], "query split .* has no images"),
        (lambda r: (r / "bounding_box_train" / "IMG_0001.jpg").write_bytes(b"x"), "IMG_0001.jpg.*naming"),
        (lambda r: (r / "bounding_box_train").rename(r / "train"), "no 'bounding_box_train'"),
    ],
    ids=["empty-split", "bad-name", "wrong-layout"],
)
def test_bad_layouts(market, tmp_path, mutate, message):
    mutate(market)
    with pytest.raises(DataError, match=message):
        _prepare(market, tmp_path / "m.h5")


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _prepare(tmp_path / "nope", tmp_path / "m.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        _prepare(tmp_path / "empty", tmp_path / "m.h5")


def test_msmt17_list_layout(tmp_path):
    root = tmp_path / "MSMT17_V1"
    lines = {"train": [], "val": [], "query": [], "gallery": []}
    for split, folder, pid, cam in [
        ("train", "train", 0, 1),
        ("train", "train", 0, 2),
        ("val", "train", 1, 3),
        ("query", "test", 5, 1),
        ("gallery", "test", 5, 2),
        ("gallery", "test", 6, 4),
    ]:
        rel = f"{pid:04d}/{pid:04d}_{len(lines[split]):03d}_{cam:02d}_0303morning_0015_0.jpg"
        (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (20, 40), (pid * 30, 10, 10)).save(buf, format="JPEG")
        (root / folder / rel).write_bytes(buf.getvalue())
        lines[split].append(f"{rel} {pid}")
    for split, ls in lines.items():
        (root / f"list_{split}.txt").write_text("\n".join(ls) + "\n")
    out = tmp_path / "msmt.h5"
    prepare_dataset(PrepareConfig(dataset="msmt17", root=root, out=out, image_size=(32, 16)))
    _, s = read_dataset(out)
    assert len(s["train"]) == 3 and list(s["train"].camids) == [0, 1, 2]  # train + val
    assert list(s["gallery"].pids) == [5, 6] and list(s["gallery"].camids) == [1, 3]


def test_msmt17_bad_list_line(tmp_path):
    root = tmp_path / "MSMT17_V1"
    (root / "train" / "0000").mkdir(parents=True)
    (root / "test" / "0001").mkdir(parents=True)
    (root / "test" / "0001" / "0001_000_01_0303morning_0015_0.jpg").write_bytes(b"x")
    (root / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg").write_bytes(b"x")
    (root / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg\n")  # the pid is missing
    (root / "list_query.txt").write_text("")
    (root / "list_gallery.txt").write_text("")
    with pytest.raises(DataError, match="list_train.txt line 1 is not 'PATH PID'"):
        prepare_dataset(PrepareConfig(dataset="msmt17", root=root, out=tmp_path / "m.h5", image_size=(32, 16)))


def test_cuhk03np_detected_subset(market, tmp_path):
    root = tmp_path / "cuhk03-np"
    root.mkdir()
    market.rename(root / "detected")
    prepare_dataset(PrepareConfig(dataset="cuhk03np", root=root, out=tmp_path / "c.h5", image_size=(32, 16)))
    with pytest.raises(DataError, match="labeled"):
        prepare_dataset(
            PrepareConfig(
                dataset="cuhk03np", root=root, out=tmp_path / "d.h5", image_size=(32, 16), cuhk03_subset="labeled"
            )
        )


def test_veri776_and_occluded_duke_layouts(market, tmp_path):
    """VeRi-776 (`image_train/`, `image_query/`, `image_test/`, `0001_c001_00016450_0.jpg`) and Occluded-Duke
    (Market's layout, Duke's names) give the identities and cameras of the same images in Market's layout."""
    import shutil

    reference = read_dataset(_prepare(market, tmp_path / "m.h5").out)[1]
    veri = tmp_path / "VeRi"
    for folder, vfolder in (
        ("bounding_box_train", "image_train"),
        ("query", "image_query"),
        ("bounding_box_test", "image_test"),
    ):
        (veri / vfolder).mkdir(parents=True)
        for i, p in enumerate(sorted((market / folder).glob("*.jpg"))):
            pid, rest = p.name.split("_c", 1)
            shutil.copy(p, veri / vfolder / f"{pid}_c{int(rest[0]):03d}_{i:08d}_0.jpg")
    shutil.copytree(market, tmp_path / "dukes" / "Occluded_Duke")
    for dataset, root in (("veri776", veri), ("occludedduke", tmp_path / "dukes")):
        cfg = PrepareConfig(dataset=dataset, root=root, out=tmp_path / f"{dataset}.h5", image_size=(32, 16))
        splits = read_dataset(prepare_dataset(cfg).out)[1]
        for name, split in splits.items():
            pairs = sorted(zip(split.pids.tolist(), split.camids.tolist(), strict=True))
            assert pairs == sorted(zip(reference[name].pids.tolist(), reference[name].camids.tolist(), strict=True))
    with pytest.raises(DataError, match="no 'image_train' found under .*; expected the VeRi-776 layout: image_train/"):
        prepare_dataset(PrepareConfig(dataset="veri776", root=market, out=tmp_path / "x.h5", image_size=(32, 16)))


def test_reader_rejects_other_files(tmp_path, market):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.attrs["format"] = "something.else"
    with pytest.raises(FormatError, match="not a reidcli dataset"):
        read_dataset(other)
    (tmp_path / "trunc.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(FormatError, match="not a readable HDF5"):
        read_dataset(tmp_path / "trunc.h5")
    out = _prepare(market, tmp_path / "m.h5").out
    with h5py.File(out, "a") as h5:
        h5.attrs["version"] = 99
    with pytest.raises(FormatError, match="version 99"):
        read_dataset(out)


def test_cli_prepare_errors_are_one_line_exit_1(tmp_path):
    r = run_cli_here("prepare", "market1501", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x.h5"))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: dataset root") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    r = run_cli_here("prepare", "imagenet", "--root", str(tmp_path))
    assert r.returncode == 1 and "unknown dataset 'imagenet'" in r.stderr


def test_cli_extra_gallery(market, tmp_path):
    out = tmp_path / "x.h5"
    r = run_cli_here("prepare", "market1501", "--root", str(market), "--out", str(out), "--extra-gallery", "nope.zip")
    assert r.returncode == 1 and r.stderr == "Error: --extra-gallery nope.zip is neither a folder nor a zip " + (
        "archive; pass the folder (or zip) of the extra images\n"
    )
    extra = _distractors(tmp_path / "images")
    r = run_cli_here("prepare", "market1501", "--root", str(market), "--out", str(out), "--extra-gallery", str(extra))
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as h5:
        assert h5.attrs["extra_gallery"] == str(extra) and h5["gallery/paths"][-1].decode().startswith("images/")


def test_cli_synthetic(tmp_path):
    small = ("--ids", "3", "--distractors", "1", "--junk", "1", "--images-per-camera", "1")
    syn = ("prepare", "synthetic", "--root", str(tmp_path / "syn"))
    r = run_cli(*syn, "--out", str(tmp_path / "s.h5"), *small, "--image-size", "32x16", "--json")
    assert r.returncode == 0, r.stderr
    assert '"split": "train"' in r.stdout
    images = sorted((tmp_path / "syn").rglob("*.jpg"))
    stamps = [p.stat().st_mtime_ns for p in images]
    # the same options again (another image size): the folder is reused, not drawn again
    r = run_cli(*syn, "--out", str(tmp_path / "t.h5"), *small, "--image-size", "64x32")
    assert r.returncode == 0 and "reusing the synthetic data" in r.stderr, r.stderr
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "syn").rglob("*.jpg"))] == stamps
    with h5py.File(tmp_path / "t.h5") as h5:
        assert list(h5.attrs["image_size"]) == [64, 32] and len(h5["train/pids"]) == len(
            [p for p in images if p.parent.name == "bounding_box_train"]
        )
    # other options, or a folder of something else: refused, nothing touched
    r = run_cli(*syn, "--out", str(tmp_path / "u.h5"), *small, "--seed", "1")
    assert r.returncode == 1 and "holds no synthetic data drawn with these options" in r.stderr
    assert not (tmp_path / "u.h5").exists()
