"""Kill real subprocesses mid-write: previous outputs stay intact, no half files, and the work can continue."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from reidcli.engine.checkpoint import RunFiles, load_checkpoint
from tests.conftest import TINY_TRAIN

TINY = TINY_TRAIN


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reidcli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting for the subprocess"
        time.sleep(0.05)


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_training_keeps_a_loadable_checkpoint_and_resumes(tiny_data, tmp_path, sig):
    run = tmp_path / "run"
    args = ("train", "--data", str(tiny_data), "--out", str(run), "--epochs", "60", *TINY)
    proc = _start(*args)
    _wait_for(lambda: RunFiles(run).checkpoint.exists())
    time.sleep(0.3)  # somewhere in a later epoch, possibly mid-save
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    assert f"Error: interrupted ({sig.name})" in proc.stderr.read()
    _no_temp_files(tmp_path)
    epoch = load_checkpoint(RunFiles(run).checkpoint)["epoch"]
    assert 1 <= epoch < 60
    # SIGINT's resume gives only the run folder: the options come from its config.json
    again = (*args, "--resume") if sig == signal.SIGTERM else ("train", "--out", str(run), "--resume")
    r = subprocess.run([sys.executable, "-m", "reidcli", *again], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(RunFiles(run).checkpoint)["epoch"] == 60 and RunFiles(run).weights.is_file()


def test_killed_prepare_leaves_the_previous_file(tmp_path):
    from reidcli.data.synthetic import SyntheticConfig, generate_synthetic

    generate_synthetic(tmp_path / "raw", SyntheticConfig(num_train_ids=60, num_test_ids=60, seed=2))
    out = tmp_path / "d.h5"
    args = ("prepare", "market1501", "--root", str(tmp_path / "raw"), "--out", str(out))
    first = subprocess.run([sys.executable, "-m", "reidcli", *args, "--image-size", "32x16"], capture_output=True)
    assert first.returncode == 0
    before = out.read_bytes()
    proc = _start(*args, "--image-size", "384x192")
    _wait_for(lambda: any(p.name.startswith(".d.h5") for p in tmp_path.iterdir()))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert out.read_bytes() == before
    _no_temp_files(tmp_path)
    with h5py.File(out) as h5:
        assert list(h5.attrs["image_size"]) == [32, 16]


def test_killed_extract_never_leaves_a_half_file(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "reidcli", "train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", *TINY],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "f.h5"
    for delay in (0.5, 1.0, 1.5, 2.0):
        proc = _start("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(out), "--batch", "4")
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _no_temp_files(tmp_path)
        if out.exists():  # finished before the signal: then it is complete
            with h5py.File(out) as h5:
                assert h5.attrs["format"] == "reidcli.features" and h5["gallery/feats"].shape[0] > 0


def test_killed_index_never_leaves_a_half_file(tmp_path):
    import numpy as np

    from reidcli.retrieval.features import FeatureSplit, write_features

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60_000, 64)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    split = FeatureSplit(feats, rng.integers(0, 500, len(feats)), rng.integers(0, 6, len(feats)))
    write_features(tmp_path / "f.h5", {"query": split, "gallery": split})
    out = tmp_path / "g.faiss"
    for delay in (0.5, 1.5, 3.0):
        proc = _start("index", str(tmp_path / "f.h5"), "--out", str(out), "--kind", "ivfpq", "--m", "8")
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        _no_temp_files(tmp_path)
        if out.exists():  # finished before the signal: then it is complete and loads
            from reidcli.retrieval.index import load_index

            assert load_index(out, feats, split.pids)[0].ntotal == len(feats)
