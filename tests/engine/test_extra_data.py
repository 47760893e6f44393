"""``--extra-data``: more datasets' train splits joined to --data's, identities and cameras kept apart."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from reidcli.data.prepare import PrepareConfig, prepare_dataset
from reidcli.data.store import dataset_cameras, read_dataset
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic
from reidcli.engine.train import joined_train_split, load_train_config
from reidcli.errors import ConfigError
from tests.conftest import TINY_MODEL, run_cli, run_cli_here


def _dataset(root, seed: int, size=(64, 32), cameras: int = 6):
    config = SyntheticConfig(num_train_ids=5, num_test_ids=2, num_distractors=1, num_junk=0, images_per_camera=1,
                             num_cameras=cameras, seed=seed)  # fmt: skip
    generate_synthetic(root / "raw", config)
    out = root / f"d{seed}.h5"
    prepare_dataset(PrepareConfig("synthetic", root / "raw", out, image_size=size))
    return out


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("second"), seed=9, cameras=3)


def test_the_joined_split_keeps_identities_and_cameras_apart(tiny_data, second):
    attrs, joined = joined_train_split(str(tiny_data), (str(second),), (64, 32))
    _, a = read_dataset(tiny_data, ("train",))
    _, b = read_dataset(second, ("train",))
    a, b = a["train"], b["train"]
    n = len(a)
    assert len(joined) == n + len(b) and attrs["name"] == "synthetic+synthetic"
    np.testing.assert_array_equal(joined.images[:n], a.images)
    np.testing.assert_array_equal(joined.images[n:], b.images)
    assert np.array_equal(joined.pids[:n], a.pids) and np.array_equal(joined.camids[:n], a.camids)  # --data's own
    assert not set(joined.pids[:n]) & set(joined.pids[n:])
    assert len(set(joined.pids.tolist())) == len(set(a.pids.tolist())) + len(set(b.pids.tolist()))
    np.testing.assert_array_equal(joined.camids[n:], b.camids + dataset_cameras(tiny_data))
    assert joined.paths == a.paths + b.paths
    with pytest.raises(ConfigError, match=r"images of .* are 64x32 but the model expects 32x16"):
        joined_train_split(str(tiny_data), (str(second),), (32, 16))


def test_train_on_two_datasets_with_sie_resume_and_doctor(tiny_data, second, tmp_path):
    out = tmp_path / "run"
    args = ("--data", str(tiny_data), "--extra-data", str(second), "--pe", "ape", *TINY_MODEL, "--batch", "16",
            "--device", "cpu", "--sie")  # fmt: skip
    r = run_cli("train", "--out", str(out), *args, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    ids = [len(set(read_dataset(p, ("train",), images=False)[1]["train"].pids.tolist())) for p in (tiny_data, second)]
    assert config["model"]["num_classes"] == sum(ids) and config["extra_data"] == [str(second)]
    assert config["model"]["sie_cameras"] == dataset_cameras(tiny_data) + dataset_cameras(second)
    assert config["dataset"] == "synthetic+synthetic"
    shift = dataset_cameras(tiny_data)
    assert config["camera_offsets"] == {str(tiny_data.resolve()): 0, str(second.resolve()): shift}
    r = run_cli("train", "--out", str(out), "--resume", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    # extraction on the joined file: its cameras as the model learned them (shifted), its own ids in the file
    r = run_cli("extract", "--run", str(out), "--data", str(second), "--out", str(tmp_path / "f.h5"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    import h5py
    import torch

    from reidcli.data.augment import normalize_batch
    from reidcli.engine.checkpoint import load_run_model

    model, _, _ = load_run_model(out)
    _, parts = read_dataset(second, ("query",))
    q = parts["query"]
    want = model.embed(
        normalize_batch(torch.from_numpy(q.images)), flip=True, camids=torch.from_numpy(q.camids + shift)
    )
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_allclose(f["query/feats"][:], want.numpy(), atol=1e-5)
        np.testing.assert_array_equal(f["query/camids"][:], q.camids)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    from reidcli.cli.doctor import _check_run

    assert _check_run(out, tiny_data)[1][:2] == ("run ↔ dataset", "ok")  # its classes: both datasets' ids
    other = tmp_path / "other.h5"
    shutil.copy(second, other)
    r = run_cli_here("train", "--out", str(out), "--resume", "--extra-data", str(other))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"was trained with --extra-data {second} (given {other})" in r.stderr, r.stderr
    saved = load_train_config(out)
    with pytest.raises(ConfigError, match="--extra-data names --data or one file twice"):
        replace(saved, extra_data=(str(tiny_data),)).validate()
    from reidcli.cli.train import resumed_config

    moved = replace(saved, extra_data=(str(tmp_path / "gone.h5"),))
    (out / "config.json").write_text(json.dumps({**config, **moved.to_dict(), "model": config["model"]}))
    with pytest.raises(ConfigError, match=r"--extra-data dataset .*gone.h5 of .* is not there from here; put it back"):
        resumed_config(out, {})


def test_combine_all_trains_on_query_and_gallery_without_distractors(tiny_data, second, tmp_path):
    attrs, joined = joined_train_split(str(tiny_data), (), (64, 32), combine_all=True)
    _, parts = read_dataset(tiny_data)
    kept = {s: parts[s].pids != 0 for s in ("query", "gallery")}
    assert len(joined) == len(parts["train"]) + sum(int(k.sum()) for k in kept.values())
    np.testing.assert_array_equal(joined.images[len(parts["train"]) :],
                                  np.concatenate([parts[s].images[k] for s, k in kept.items()]))  # fmt: skip
    assert 0 not in set(joined.pids.tolist()) and (parts["gallery"].pids == 0).any()  # distractors stay out
    ids = set(parts["train"].pids.tolist()) | set(parts["query"].pids.tolist()) | set(parts["gallery"].pids.tolist())
    assert set(joined.pids.tolist()) == ids - {0}
    out = tmp_path / "all"
    r = run_cli("train", "--data", str(tiny_data), "--extra-data", str(second), "--combine-all", "--out", str(out),
                *TINY_MODEL, "--batch", "16", "--epochs", "1", "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    _, both = joined_train_split(str(tiny_data), (str(second),), (64, 32), combine_all=True, images=False)
    assert config["combine_all"] and config["model"]["num_classes"] == len(set(both.pids.tolist())) > len(ids)
    with pytest.raises(ConfigError, match="--eval-every would evaluate on training images"):
        replace(load_train_config(out), eval_every=1).validate()
