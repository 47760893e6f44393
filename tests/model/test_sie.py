"""TransReID's side-information embedding (``--sie``): one learnable vector per camera, added to every token."""

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reidcli.errors import ConfigError
from reidcli.model.vit import ModelConfig, ViTReID, parameter_report
from reidcli.model.weights import load_init_weights
from tests.conftest import TINY_MODEL, run_cli, run_cli_here

SMALL = {"image_size": (32, 16), "patch_size": 8, "stride": 8, "dim": 16, "depth": 2, "heads": 2, "drop_path": 0.0}


def _model(cameras: int = 3, weight: float = 3.0, pe: str = "both") -> ViTReID:
    torch.manual_seed(0)
    return ViTReID(ModelConfig(pe=pe, sie_cameras=cameras, sie_weight=weight, num_classes=5, **SMALL)).eval()


def test_each_token_gets_its_cameras_vector_times_the_coefficient():
    model = _model(cameras=3, weight=2.5)
    x = torch.randn(4, 3, 32, 16)
    cams = torch.tensor([0, 2, 1, 2])
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("tokens", args[0].detach()))
    model(x, cams)
    plain = torch.cat([model.cls_token.expand(4, -1, -1), model.patch_embed(x)], dim=1) + model.pos.pos_embed
    expected = plain + 2.5 * model.sie_embed[cams]  # (4, 1, D) broadcast over the N+1 tokens
    torch.testing.assert_close(seen["tokens"], expected)
    assert model.sie_embed.shape == (3, 1, 16) and model.uses_cameras
    report = parameter_report(model)
    assert report["sie"] == 3 * 16 and "sie_embed" in model.no_weight_decay()
    with pytest.raises(ConfigError, match="embeds each image's camera"):
        model(x)


def test_the_camera_changes_the_feature_and_flip_averaging_keeps_it():
    model = _model()
    x = torch.randn(2, 3, 32, 16)
    zero, two = (model.embed(x, flip=True, camids=torch.full((2,), c)) for c in (0, 2))
    assert (zero - two).abs().max() > 1e-3  # the camera is part of the embedding
    c = torch.tensor([2, 0])
    by_hand = model._test_feature(x, c) + model._test_feature(x.flip(3), c)
    torch.testing.assert_close(model.embed(x, flip=True, camids=c), torch.nn.functional.normalize(by_hand, dim=1))
    still = _model(weight=0.0)  # coefficient 0: the camera no longer matters
    torch.testing.assert_close(still.embed(x, camids=torch.tensor([0, 1])), still.embed(x, camids=torch.tensor([2, 2])))


def test_only_the_cameras_in_a_batch_get_gradient():
    model = _model(cameras=4).train()
    out = model(torch.randn(6, 3, 32, 16), torch.tensor([0, 0, 3, 3, 0, 3]))
    (out.logits.square().mean() + out.feat.square().mean()).backward()
    norms = model.sie_embed.grad.flatten(1).norm(dim=1)
    assert norms[0] > 0 and norms[3] > 0 and norms[1] == 0 and norms[2] == 0


def test_initial_weights_of_other_cameras_start_fresh():
    """TransReID checkpoints carry sie_embed for their dataset's cameras: another camera count is left out."""
    source = _model(cameras=6).state_dict()
    target = _model(cameras=3)
    before = target.sie_embed.detach().clone()
    keys = load_init_weights(target, dict(source))
    assert "sie_embed" in keys["missing"] and torch.equal(target.sie_embed, before)
    same = _model(cameras=6)
    with torch.no_grad():
        same.sie_embed.zero_()
    load_init_weights(same, dict(source))
    torch.testing.assert_close(same.sie_embed, source["sie_embed"])


def test_train_extract_and_resume_with_sie(tiny_data, tmp_path):
    """--sie takes the dataset's camera count; each step embeds every image's camera (the rows of the cameras in
    the train split learn), extraction uses each image's own camera, and the run resumes with it."""
    run = tmp_path / "run"
    args = (
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--pe",
        "ape",
        *TINY_MODEL,
        "--batch",
        "16",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    r = run_cli("train", *args, "--sie", "--sie-weight", "2", "--optimizer", "adamw", "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())["model"]
    with h5py.File(tiny_data) as f:
        cameras = 1 + max(int(f[s]["camids"][:].max()) for s in ("train", "query", "gallery"))
        train_cams = np.unique(f["train/camids"][:])
        images, camids = f["query/images"][:8], f["query/camids"][:8]
    assert (config["sie_cameras"], config["sie_weight"]) == (cameras, 2.0)
    trained = load_file(str(run / "model.safetensors"))["sie_embed"]
    torch.manual_seed(0)  # the run's seed: the model as it was built, before the first step
    initial = ViTReID(ModelConfig.from_dict(config)).sie_embed.detach()
    moved = (trained - initial).flatten(1).norm(dim=1) > 0
    assert moved[train_cams].all() and trained.shape == (cameras, 1, 32)
    r = run_cli("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 0, r.stderr
    from reidcli.data.augment import normalize_batch
    from reidcli.engine.checkpoint import load_run_model

    model = load_run_model(run)[0]
    x = normalize_batch(torch.from_numpy(images))
    own = model.embed(x, flip=True, camids=torch.from_numpy(camids)).numpy()
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_allclose(f["query/feats"][:8], own, atol=1e-5)
    # searching its index with an image: the camera that took it is needed, and must be one the model knows
    from PIL import Image

    from reidcli.retrieval.search import search_images

    r = run_cli("index", str(tmp_path / "f.h5"), "--out", str(tmp_path / "f.faiss"))
    assert r.returncode == 0, r.stderr
    Image.fromarray(images[0]).save(tmp_path / "q.png")
    query = [tmp_path / "q.png"]
    with pytest.raises(ConfigError, match="pass --camid, the camera that took the query images"):
        search_images(tmp_path / "f.faiss", query)
    with pytest.raises(ConfigError, match=f"--camid {cameras}: .* embeds cameras 0–{cameras - 1}"):
        search_images(tmp_path / "f.faiss", query, camid=cameras)
    found = search_images(tmp_path / "f.faiss", query, top_k=5, camid=int(camids[0]))
    with h5py.File(tmp_path / "f.h5") as f:
        expected = np.argsort(-(f["gallery/feats"][:] @ f["query/feats"][0]), kind="stable")[:5]
    assert found.rows[0].tolist() == expected.tolist()  # its own camera: the list of its extracted feature
    r = run_cli("train", "--out", str(run), "--resume", "--epochs", "2")
    assert r.returncode == 0 and json.loads((run / "config.json").read_text())["model"]["sie_cameras"] == cameras
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # one more epoch, with the camera embeddings
    r = run_cli_here("train", "--out", str(run), "--resume", "--epochs", "3", "--no-sie")
    assert r.returncode == 1 and "was trained with --sie (cameras)" in r.stderr
    # a dataset with a camera the model has no embedding for: refused before anything is embedded
    other = tmp_path / "more_cameras.h5"
    other.write_bytes(tiny_data.read_bytes())
    with h5py.File(other, "a") as f:
        f["query/camids"][0] = cameras + 2
    r = run_cli_here("extract", "--run", str(run), "--data", str(other), "--out", str(tmp_path / "g.h5"))
    assert r.returncode == 1 and f"but camera {cameras + 2} is in {other}'s query split" in r.stderr, r.stderr
    assert not (tmp_path / "g.h5").exists()


def test_sie_options_without_sie_are_refused(tiny_data, tmp_path):
    r = run_cli_here("train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--sie-weight", "1")
    assert (
        r.returncode == 1
        and r.stderr.strip() == "Error: --sie-weight has no effect without --sie; leave it out or add --sie"
    )
