"""``reid export``: the run's test-time embedding as an ONNX graph whose features equal ``reid extract``'s."""

import json
import sys

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch

from reidcli.engine.checkpoint import RunFiles, save_weights, write_json_atomic
from reidcli.engine.export import ExportConfig, export_onnx, onnx_metadata
from reidcli.errors import ConfigError
from reidcli.model.vit import ModelConfig, ViTReID
from tests.conftest import run_cli, run_cli_here


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def trained(both_run):
    """A `both` run trained and extracted through the CLI (root / "f.h5")."""
    return both_run


def test_the_onnx_file_gives_the_extracted_features_at_any_batch_size(trained, tiny_data):
    root, run = trained
    out = root / "deploy" / "both.onnx"
    r = run_cli("export", "--run", str(run), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["checked"] and res["max_abs_diff"] <= 1e-4 and res["min_cosine"] > 0.9999
    assert res["inputs"] == {"images": ["batch", 64, 32, 3]} and res["bytes"] == out.stat().st_size
    session = _session(out)
    with h5py.File(tiny_data) as f:
        images = f["query/images"][:]
    with h5py.File(root / "f.h5") as f:
        want, sha = f["query/feats"][:], f.attrs["checkpoint_sha256"]
    got = session.run(["features"], {"images": images})[0]  # the whole split in one batch
    np.testing.assert_allclose(got, want, atol=1e-5)  # uint8 pixels in, the features file's rows out
    one = session.run(["features"], {"images": images[3:4]})[0]
    np.testing.assert_allclose(one[0], want[3], atol=1e-5)
    meta = onnx_metadata(out)
    assert meta["checkpoint_sha256"] == sha  # the same weights as the features file records
    assert meta["flip"] == "1" and meta["image_size"] == "64x32"
    assert json.loads(meta["model_config"])["pe"] == "both"
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it


def test_a_camera_and_jigsaw_model_exports_with_a_camids_input_and_float_pixels(tmp_path):
    """SIE + JPM with the relative bias, written as a run folder; --input float --no-flip."""
    torch.manual_seed(0)
    cfg = ModelConfig(pe="both", image_size=(32, 16), patch_size=8, stride=8, dim=16, depth=2, heads=2,
                      drop_path=0.0, num_classes=5, sie_cameras=3, jpm=True, jpm_groups=2)  # fmt: skip
    model = ViTReID(cfg).eval()
    with torch.no_grad():  # tables away from zero so that the bias matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    files = RunFiles(tmp_path / "run")
    files.root.mkdir()
    write_json_atomic(files.config, {"model": cfg.to_dict(), "dataset": "synthetic"})
    save_weights(files.weights, model, {})
    out = tmp_path / "sie.onnx"
    res = export_onnx(ExportConfig(run=str(files.root), out=str(out), flip=False, input="float"))
    assert res.checked and res.max_abs_diff <= 1e-4 and res.feature_dim == 16 * 3
    assert res.inputs == {"images": ["batch", 3, 32, 16], "camids": ["batch"]}
    x = torch.randn(4, 3, 32, 16)
    cams = torch.tensor([2, 0, 1, 2])
    got = _session(out).run(["features"], {"images": x.numpy(), "camids": cams.numpy()})[0]
    want = model.embed(x, flip=False, camids=cams).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    other = _session(out).run(["features"], {"images": x.numpy(), "camids": np.zeros(4, np.int64)})[0]
    assert np.abs(other - got).max() > 1e-3  # the camera input is used
    # reid doctor: the file against the run, and a features file as wide as the JPM test feature (3 × 16)
    from reidcli.cli.doctor import _check_features, _check_onnx
    from reidcli.fileio import sha256_file
    from reidcli.retrieval.features import FeatureSplit, write_features

    (onnx_row, run_row) = _check_onnx(out, files.root)
    assert onnx_row[1] == "ok" and "camids (batch)" in onnx_row[2] and "no flip" in onnx_row[2]
    assert run_row[:2] == ("ONNX ↔ run", "ok")
    split = FeatureSplit(np.eye(4, 48, dtype=np.float32), np.arange(4), np.zeros(4, np.int64))
    provenance = {"checkpoint": str(files.weights), "checkpoint_sha256": sha256_file(files.weights)}
    write_features(tmp_path / "f.h5", {"query": split, "gallery": split}, provenance)
    assert _check_features(tmp_path / "f.h5", files.root, None)[1][:2] == ("features ↔ run", "ok")


def test_a_file_that_fails_the_check_is_not_written(trained, monkeypatch):
    import reidcli.engine.export as export_module

    root, run = trained
    out = root / "bad" / "m.onnx"
    out.parent.mkdir()
    monkeypatch.setattr(export_module, "CHECK_TOLERANCE", -1.0)  # no file can pass
    with pytest.raises(ConfigError, match="not written"):
        export_onnx(ExportConfig(run=str(run), out=str(out)))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: written, and said to be unchecked
    res = export_onnx(ExportConfig(run=str(run), out=str(out)))
    assert not res.checked and "onnxruntime is not installed" in res.note and out.is_file()


def test_refusals_are_one_line_errors(trained, tmp_path, monkeypatch):
    _, run = trained
    cases = [
        ({"out": str(tmp_path / "m.pt")}, "should end in .onnx"),
        ({"input": "rgb"}, "unknown --input 'rgb'"),
        ({"opset": 11}, "--opset 11 is too old for torch's ONNX exporter; give 18 or newer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            ExportConfig(**{"run": str(run), "out": str(tmp_path / "m.onnx"), **kwargs}).validate()
    r = run_cli_here("export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"Error: {tmp_path / 'nothing'} is not a run folder (no config.json); train one with 'reid train'"
    )
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ConfigError, match=r"needs the onnxscript package: pip install 'reidcli\[export\]'"):
        export_onnx(ExportConfig(run=str(run), out=str(tmp_path / "m.onnx")))


def test_doctor_tells_a_stale_or_invalid_onnx_file(trained, tmp_path):
    import shutil

    from reidcli.cli.doctor import _check_onnx
    from reidcli.errors import FormatError

    _, run = trained
    out = tmp_path / "m.onnx"
    export_onnx(ExportConfig(run=str(run), out=str(out), check=False))
    r = run_cli_here("doctor", "--onnx", str(out), "--run", str(run), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    assert checks["ONNX ↔ run"]["status"] == "ok" and "images (batch, 64, 32, 3)" in checks["ONNX"]["detail"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # trained again since
    assert "export it again" in _check_onnx(out, copy)[1][2] and _check_onnx(out, copy)[1][1] == "FAIL"
    meta_path = tmp_path / "moved.onnx"
    shutil.copy(out, meta_path)
    assert _check_onnx(meta_path, None)[1][:2] == ("ONNX ↔ weights", "ok")  # the weights it names, as they are now
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(FormatError, match="is not a valid ONNX model"):
        _check_onnx(tmp_path / "bad.onnx", None)
