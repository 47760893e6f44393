"""The rest of the bad-input catalogue (docs/reliability.md); other rows live beside the code they test."""

import json
import shutil
import zipfile

import h5py
import numpy as np
import pytest

from reidcli.data.prepare import PrepareConfig, prepare_dataset
from reidcli.data.store import read_dataset
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic
from reidcli.errors import DataError, FormatError
from tests.conftest import TINY_MODEL, run_cli, run_cli_here, train_tiny_run

SMALL = SyntheticConfig(num_train_ids=3, num_test_ids=3, num_distractors=1, num_junk=1, images_per_camera=1, seed=9)
TINY = (*TINY_MODEL, "--batch", "16", "--epochs", "1", "--device", "cpu")


def _prepare(root, out):
    return prepare_dataset(PrepareConfig(dataset="market1501", root=root, out=out, image_size=(32, 16)))


def test_two_datasets_under_one_root_is_ambiguous(tmp_path):
    generate_synthetic(tmp_path / "a", SMALL)
    generate_synthetic(tmp_path / "b", SMALL)
    with pytest.raises(DataError, match="several 'bounding_box_train' folders.*point --root at one"):
        _prepare(tmp_path, tmp_path / "x.h5")


def test_zip_of_a_zip(tmp_path):
    generate_synthetic(tmp_path / "m", SMALL)
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as z:
        for p in (tmp_path / "m").rglob("*.jpg"):
            z.write(p, p.relative_to(tmp_path).as_posix())
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as z:
        z.write(inner, "inner.zip")
    with pytest.raises(DataError, match="only holds other zip archives.*unzip it once"):
        _prepare(outer, tmp_path / "x.h5")


def test_not_a_zip_file(tmp_path):
    (tmp_path / "data.tar").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="not a zip archive"):
        _prepare(tmp_path / "data.tar", tmp_path / "x.h5")


def test_dataset_file_with_mismatched_lengths(tmp_path):
    generate_synthetic(tmp_path / "m", SMALL)
    out = _prepare(tmp_path / "m", tmp_path / "d.h5").out
    with h5py.File(out, "a") as h5:
        del h5["query/pids"]
        h5["query"].create_dataset("pids", data=np.zeros(1, np.int64))
    with pytest.raises(FormatError, match="split 'query' has mismatched lengths"):
        read_dataset(out)


@pytest.fixture(scope="module")
def ape_run(tiny_data, tmp_path_factory):
    return train_tiny_run(tiny_data, tmp_path_factory.mktemp("runs") / "ape", "ape", "--epochs", "1", "--device", "cpu")


def test_resume_with_another_pe_is_refused(tiny_data, ape_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(ape_run, run)
    r = run_cli_here(
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--pe",
        "rpe",
        *TINY[:-4],
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--resume",
    )
    assert r.returncode == 1 and "was trained with --pe ape (given rpe)" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_takes_the_runs_own_options(tiny_data, ape_run, tmp_path):
    """`reid train --out RUN --resume --epochs 2`: model, loss, batch and optimiser come from config.json."""
    run = tmp_path / "copy"
    shutil.copytree(ape_run, run)
    before = json.loads((run / "config.json").read_text())
    r = run_cli("train", "--out", str(run), "--resume", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    after = json.loads((run / "config.json").read_text())
    assert after == {**before, "epochs": 2, "run_dir": str(run)}
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    r = run_cli_here("train", "--out", str(run), "--resume", "--lr", "0.5", "--batch", "32", "--ce-weight", "3")
    assert r.returncode == 1 and "--batch 16 (given 32), --lr 0.008 (given 0.5)" in r.stderr
    assert "--ce-weight 1.0 (given 3.0)" in r.stderr
    # a dataset path that does not reach from here (config.json keeps it as given): named, with the fix
    (run / "config.json").write_text(json.dumps({**after, "data": "moved.h5"}))
    r = run_cli_here("train", "--out", str(run), "--resume", "--epochs", "3")
    assert r.returncode == 1 and "(moved.h5, from its config.json) is not there from here; pass --data" in r.stderr
    r = run_cli("train", "--out", str(run), "--resume", "--epochs", "3", "--data", str(tiny_data))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "is not a run's config (Expecting"), ('{"model": {"pe": "ape"}}', "is not a training config this reidcli")],
)
def test_damaged_config_json(tiny_data, ape_run, tmp_path, text, message):
    run = tmp_path / "copy"
    shutil.copytree(ape_run, run)
    (run / "config.json").write_text(text)
    r = run_cli_here("train", "--out", str(run), "--resume")
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    if text == "{":
        r = run_cli_here("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "f.h5"))
        assert r.returncode == 1 and message in r.stderr


def test_train_without_data_names_the_option(tmp_path):
    r = run_cli_here("train", "--out", str(tmp_path / "new"), "--resume")
    assert r.returncode == 1 and "--data is missing" in r.stderr


def test_run_folder_whose_weights_do_not_fit_its_config(tiny_data, ape_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(ape_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["pe"] = "both"
    (run / "config.json").write_text(json.dumps(config))
    r = run_cli_here("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 1 and "do not fit the model in config.json" in r.stderr
    assert not (tmp_path / "f.h5").exists()


def test_extract_on_a_dataset_of_another_size(ape_run, tmp_path):
    generate_synthetic(tmp_path / "m", SMALL)
    other = prepare_dataset(
        PrepareConfig(dataset="market1501", root=tmp_path / "m", out=tmp_path / "o.h5", image_size=(48, 24))
    ).out
    r = run_cli_here("extract", "--run", str(ape_run), "--data", str(other), "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 1 and "prepare the data at that size" in r.stderr


def test_not_a_run_folder(tiny_data, tmp_path):
    r = run_cli_here("extract", "--run", str(tmp_path), "--data", str(tiny_data), "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 1 and "is not a run folder" in r.stderr


def test_evaluate_index_of_other_features(tiny_data, ape_run, tmp_path):
    feats = tmp_path / "f.h5"
    assert run_cli_here("extract", "--run", str(ape_run), "--data", str(tiny_data), "--out", str(feats)).returncode == 0
    assert run_cli_here("index", str(feats), "--out", str(tmp_path / "i.faiss")).returncode == 0
    with h5py.File(feats, "a") as h5:
        h5["gallery/feats"][0] = -h5["gallery/feats"][0]
    r = run_cli_here("evaluate", str(feats), "--index", str(tmp_path / "i.faiss"))
    assert r.returncode == 1 and "built from other features" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("evaluate", "F", "--k1", "30"), "--k1 has no effect without --rerank; leave it out or add --rerank"),
        (
            ("evaluate", "F", "--engine", "torch", "--index", "i.faiss"),
            "--index has no effect without the faiss engine's ranked lists (--engine torch scores every gallery "
            "image itself); leave it out or drop --engine torch",
        ),
        (("evaluate", "F", "--rerank", "--depth", "500"), "--depth has no effect without the faiss engine's"),
        (("evaluate", "F", "--top-k", "5"), "--top-k has no effect without --visualize N"),
        (("evaluate", "F", "--rerank", "--engine", "faiss"), "--engine faiss has no effect with --rerank"),
        (("evaluate", "F", "--aqe-k", "3"), "--aqe-k has no effect without --aqe; leave it out or add --aqe"),
        (("evaluate", "F", "--aqe", "--index", "i.faiss"), "--index holds the gallery features before --aqe expands"),
        (
            ("index", "F", "--out", "i.faiss", "--nlist", "64", "--m", "8"),
            "--nlist, --m have no effect without --kind ivfpq",
        ),
        (("prepare", "market1501", "--root", "D", "--ids", "50"), "--ids has no effect without the synthetic dataset"),
        (("prepare", "msmt17", "--root", "D", "--cuhk03-subset", "labeled"), "--cuhk03-subset has no effect"),
        (
            ("train", "--data", "D", "--out", "r", "--rp-weight", "2"),
            "--rp-weight has no effect without rp-triplet in --loss",
        ),
        (
            ("train", "--data", "D", "--out", "r", "--loss", "ce", "--margin", "0.3"),
            "--margin has no effect without triplet",
        ),
        (
            ("train", "--data", "D", "--out", "r", "--compile-mode", "default"),
            "--compile-mode has no effect without --compile",
        ),
        (
            ("ablate", "--data", "D", "--out", "a", "--loss", "ce,ce+triplet", "--rp-form", "raw"),
            "--rp-form has no effect",
        ),
        (
            ("train", "--data", "D", "--out", "r", "--loss", "ce", "--triplet-weight", "2"),
            "--triplet-weight has no effect without triplet in --loss",
        ),
        (
            ("train", "--data", "D", "--out", "r", "--center-lr", "0.1"),
            "--center-lr has no effect without center in --loss",
        ),
        (
            ("ablate", "--data", "D", "--out", "a", "--loss", "ce,ce+triplet", "--center-weight", "0.1"),
            "--center-weight has no effect",
        ),
    ],
)
def test_options_that_would_do_nothing_are_refused_before_any_work(tmp_path, args, message):
    """An option typed where the command ignores it (`--k1` without `--rerank`, `--index` with `--engine torch`)
    was silently dropped: the user believed in a result the command had not computed. The files named do not
    exist: the refusal comes before anything is read."""
    args = [str(tmp_path / a) if a in ("F", "D") else a for a in args]
    r = run_cli_here(*args)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize(
    ("splits", "message"),
    [(("foo",), "unknown split 'foo'"), ((), "no split")],  # were "re-prepare the dataset" / an empty features file
)
def test_extract_splits_are_checked(splits, message):
    from reidcli.engine.extract import ExtractConfig
    from reidcli.errors import ConfigError

    with pytest.raises(ConfigError, match=message + r"; give a comma-separated list of train, query, gallery"):
        ExtractConfig(run="r", data="d.h5", out="f.h5", splits=splits).validate()


def test_doctor_tells_stale_and_foreign_features(tiny_data, ape_run, tmp_path):
    """`reid doctor --features`: features extracted from a checkpoint during training, after which the run finished,
    are stale; another run's features, and features of another dataset, are named; the run's own are ok."""
    import json as json_

    run = tmp_path / "run"
    shutil.copytree(ape_run, run)
    final = run / "model.safetensors"
    final.rename(tmp_path / "final.safetensors")  # as during training: only checkpoint.pt
    early = tmp_path / "early.h5"
    assert run_cli_here("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(early)).returncode == 0
    (tmp_path / "final.safetensors").rename(final)  # the run finishes
    late = tmp_path / "late.h5"
    assert run_cli_here("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(late)).returncode == 0

    def checks(*args):
        r = run_cli_here("doctor", *args, "--json")
        return r.returncode, {c["check"]: c for c in json_.loads(r.stdout)}

    code, c = checks("--features", str(late), "--run", str(run), "--data", str(tiny_data))
    assert code == 0 and c["features ↔ run"]["status"] == c["features ↔ dataset"]["status"] == "ok"
    assert "query" in c["features"]["detail"] and "rows of 32 values" in c["features"]["detail"]
    code, c = checks("--features", str(early), "--run", str(run))
    assert code == 1 and "the run has finished since: extract them again" in c["features ↔ run"]["detail"]
    other = tmp_path / "other"
    generate_synthetic(other / "raw", SMALL)
    prepare_dataset(PrepareConfig("synthetic", other / "raw", other / "o.h5", image_size=(64, 32)))
    code, c = checks("--features", str(late), "--data", str(other / "o.h5"))
    assert code == 1 and "features of another dataset?" in c["features ↔ dataset"]["detail"]
    assert c["features ↔ weights"]["status"] == "ok"  # without --run: the weights it names, as they are now
    final.write_bytes(final.read_bytes() + b" ")  # weights changed since (trained again)
    code, c = checks("--features", str(late))
    assert code == 1 and "has changed since: the features are stale" in c["features ↔ weights"]["detail"]
