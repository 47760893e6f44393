import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from reidcli.engine.checkpoint import RunFiles, load_checkpoint
from reidcli.engine.train import TrainConfig, lr_at, train
from reidcli.errors import ConfigError, TrainingError
from reidcli.losses.combined import LossConfig
from reidcli.model.vit import ModelConfig


def _cfg(data, run, **kw) -> TrainConfig:
    model = ModelConfig(pe="both", image_size=(64, 32), dim=32, depth=2, heads=4, drop_path=0.1)
    base = TrainConfig(
        data=str(data),
        run_dir=str(run),
        model=model,
        loss=LossConfig(spec="ce+triplet+rp-triplet", top_n=4),
        epochs=2,
        batch=16,
        k=4,
        optimizer="adamw",
        lr=1e-3,
        warmup_epochs=1,
        device="cpu",
    )
    return replace(base, **kw)


class Stop(Exception):
    pass


def test_resume_continues_the_same_trajectory(tiny_data, tmp_path):
    """With the center loss too: its centres (outside the model) are in the checkpoint and restored."""
    loss = LossConfig(spec="ce+triplet+center+rp-triplet", top_n=4, center_weight=0.01)
    straight = train(_cfg(tiny_data, tmp_path / "a", loss=loss))

    def interrupt(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(_cfg(tiny_data, tmp_path / "b", loss=loss), on_epoch=interrupt)
    halfway = load_checkpoint(RunFiles(tmp_path / "b").checkpoint)
    assert halfway["epoch"] == 1 and halfway["centers"].shape == (12, 32)
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(tiny_data, tmp_path / "b", loss=loss))
    resumed = train(_cfg(tiny_data, tmp_path / "b", loss=loss), resume=True)
    wa = load_file(str(RunFiles(tmp_path / "a").weights))
    wb = load_file(str(RunFiles(tmp_path / "b").weights))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    centers = [load_checkpoint(RunFiles(tmp_path / r).checkpoint)["centers"] for r in "ab"]
    assert torch.equal(*centers) and not torch.equal(centers[1], halfway["centers"])
    assert "centers" not in wa  # training state, not part of the model's weights
    for key in ("loss", "loss_ce", "loss_triplet", "loss_center", "loss_rp-triplet"):
        assert [m[key] for m in straight.metrics] == [m[key] for m in resumed.metrics]


@pytest.mark.parametrize("fails", ["write_metrics", "save_checkpoint"])
def test_a_kill_between_the_checkpoint_and_the_metrics_loses_no_epoch(fails, tiny_data, tmp_path, monkeypatch):
    """Epoch 2's save is cut after its first file or before it: resuming gives the uninterrupted run's metrics
    rows, each epoch once (the checkpoint is never newer than the metrics)."""
    import reidcli.engine.train as engine

    straight = train(_cfg(tiny_data, tmp_path / "a"))
    real = getattr(engine, fails)

    def cut(path, payload):
        epoch = payload["epoch"] if isinstance(payload, dict) else len(payload)
        if epoch == 2:
            raise Stop
        real(path, payload)

    monkeypatch.setattr(engine, fails, cut)
    with pytest.raises(Stop):
        train(_cfg(tiny_data, tmp_path / "b"))
    monkeypatch.setattr(engine, fails, real)
    resumed = train(_cfg(tiny_data, tmp_path / "b"), resume=True)
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in straight.metrics]
    on_disk = [json.loads(line) for line in RunFiles(tmp_path / "b").metrics.read_text().splitlines()]
    assert [m["loss"] for m in on_disk] == [m["loss"] for m in straight.metrics]


def test_run_folder_contents(tiny_data, tmp_path):
    result = train(_cfg(tiny_data, tmp_path / "r", epochs=1))
    files = RunFiles(result.run_dir)
    config = json.loads(files.config.read_text())
    assert config["model"]["pe"] == "both" and config["model"]["num_classes"] == 12
    env = config["environment"]  # what ran it, and what precision "auto" became there
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["precision"] == "fp32"
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert (
        rows[0]["epoch"] == 1
        and {
            "loss_ce",
            "loss_triplet",
            "loss_rp-triplet",
            "lr",
            "images_per_s",
            "grad_norm_max",
            "ape_norm",
            "rpe_norm",
        }
        <= rows[0].keys()
    )
    assert files.weights.is_file() and files.curves.is_file() and files.curves.stat().st_size > 1000
    assert not list(files.root.glob(".*tmp"))
    # a config.json that says center loss over a checkpoint without centres (files of two runs mixed) is named
    config["loss"]["spec"] = "ce+triplet+center+rp-triplet"
    files.config.write_text(json.dumps(config))
    loss = LossConfig(spec="ce+triplet+center+rp-triplet", top_n=4)
    with pytest.raises(ConfigError, match="holds no center-loss centres; resume with the run's own --loss"):
        train(_cfg(tiny_data, tmp_path / "r", epochs=2, loss=loss), resume=True)


def test_nan_stops_with_the_component_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import reidcli.engine.train as engine
    from reidcli.data.store import read_dataset

    real = engine.augment_batch
    calls = {"n": 0}
    per_epoch = len(read_dataset(tiny_data, ("train",), images=False)[1]["train"]) // 16

    def poisoned(images, cfg, gen=None, r=None):
        calls["n"] += 1
        x = real(images, cfg, gen, r)
        return x * float("nan") if calls["n"] > per_epoch else x  # poison the first batch of epoch 2

    monkeypatch.setattr(engine, "augment_batch", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss component 'ce' became non-finite in epoch 2.*last good checkpoint"):
        train(_cfg(tiny_data, run, epochs=3, check_every=1))
    ckpt = load_checkpoint(RunFiles(run).checkpoint)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(data="", run_dir="", epochs=10, warmup_epochs=2, lr=1.0)
    assert lr_at(0, 10, cfg) == pytest.approx(0.01)
    assert lr_at(20, 10, cfg) == pytest.approx(1.0)
    assert lr_at(100, 10, cfg) == pytest.approx(0.002)
    assert lr_at(60, 10, cfg) == pytest.approx(0.002 + 0.5 * 0.998)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"epochs": -1}, "--epochs"),
        ({"batch": 18, "k": 4}, "multiple of --k"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"init": "/nonexistent/vit.pth"}, "--init /nonexistent/vit.pth not found"),
    ],
)
def test_bad_training_options(tiny_data, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(tiny_data, tmp_path / "x", **kw))


def test_rp_triplet_needs_positions(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "x")
    with pytest.raises(ConfigError, match="position"):
        train(replace(cfg, model=replace(cfg.model, pe="none")))


def test_k_larger_than_ids_batch(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="identities"):
        train(_cfg(tiny_data, tmp_path / "x", batch=64, k=4))  # 16 ids asked, 12 exist


def test_exploding_gradient_stops_the_run(tiny_data, tmp_path):
    with pytest.raises(TrainingError, match="gradient norm exploded .* in epoch 1"):
        train(_cfg(tiny_data, tmp_path / "g", max_grad_norm=1e-6))
    assert not RunFiles(tmp_path / "g").checkpoint.exists()


def test_trajectory_changes_name_the_options_resume_keeps(tmp_path):
    from reidcli.engine.train import trajectory_changes

    saved = _cfg("d.h5", tmp_path)
    free = replace(saved, data="elsewhere.h5", epochs=9, device="cuda", precision="bf16", compile=True, eval_every=3)
    assert trajectory_changes(saved, free) == []
    model = replace(saved.model, pe="ape", image_size=(128, 64), num_classes=7)  # num_classes: set at build
    loss = replace(saved.loss, spec="ce", rp_form="raw")
    changed = replace(saved, model=model, loss=loss, lr=0.1, seed=3)
    assert trajectory_changes(saved, changed) == [
        "--pe both (given ape)",
        "--image-size 64x32 (given 128x64)",
        "--loss ce+triplet+rp-triplet (given ce)",
        "--rp-form stable (given raw)",
        "--lr 0.001 (given 0.1)",
        "--seed 0 (given 3)",
    ]
    # config.json's extra keys and an old file's `bf16` read back
    d = {**saved.to_dict(), "dataset": "synthetic", "num_train_ids": 12, "world_size": 1}
    assert TrainConfig.from_dict(d) == saved


def test_resume_loads_no_initial_weights_and_needs_no_init_file(tiny_data, tmp_path, monkeypatch):
    """The checkpoint's weights replace --init's: a resumed run neither reads the --init file (it may have moved)
    nor asks the hub again for --pretrained ones (a resumed run works offline)."""
    import reidcli.model.weights as weights
    from reidcli.model.vit import ViTReID

    init = tmp_path / "init.pth"
    cfg = _cfg(tiny_data, tmp_path / "r", init=str(init), epochs=1)
    torch.save(ViTReID(replace(cfg.model, num_classes=0)).state_dict(), init)
    train(cfg)
    init.unlink()
    monkeypatch.setattr(weights, "load_state_file", lambda *a: pytest.fail("--init read again on resume"))
    monkeypatch.setattr(weights, "load_pretrained", lambda *a: pytest.fail("hub asked again on resume"))
    resumed = train(replace(cfg, epochs=2), resume=True)
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]
    with pytest.raises(ConfigError, match="--init .* not found"):  # a new run still needs the file
        train(replace(cfg, run_dir=str(tmp_path / "new")))


def test_damaged_metrics_file_is_named(tmp_path):
    from reidcli.engine.checkpoint import read_metrics
    from reidcli.errors import FormatError

    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # not written yet
    path.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "lo\n')
    with pytest.raises(FormatError, match="metrics.jsonl is damaged"):
        read_metrics(path)


def test_curves_are_redrawn_during_a_run(tiny_data, tmp_path, monkeypatch):
    """A long run's curves.png follows its progress (at most once a minute), not only its end."""
    import reidcli.engine.train as engine

    monkeypatch.setattr(engine, "CURVES_EVERY_S", 0.0)

    def interrupt(row):
        raise Stop

    with pytest.raises(Stop):
        train(_cfg(tiny_data, tmp_path / "r", epochs=3), on_epoch=interrupt)
    files = RunFiles(tmp_path / "r")
    assert files.curves.stat().st_size > 5000 and not files.weights.exists()


def test_initial_weights_that_leave_backbone_tensors_out_are_named(tiny_data, tmp_path, caplog):
    """`--init` loads what fits; backbone tensors it lacks (another naming or depth) start from random values and
    are named in a warning, as are its blocks the model has no place for; a complete file warns of nothing."""
    from safetensors.torch import save_file

    first = train(_cfg(tiny_data, tmp_path / "a", epochs=1))
    weights = load_file(str(RunFiles(first.run_dir).weights))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("blocks.1.")}, str(tmp_path / "partial.safetensors")
    )
    with caplog.at_level("INFO", logger="reidcli.engine.train"):
        train(_cfg(tiny_data, tmp_path / "b", epochs=1, init=str(tmp_path / "partial.safetensors")))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("12 backbone tensors are not in") and "blocks.1." in warned[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="reidcli.engine.train"):
        train(_cfg(tiny_data, tmp_path / "c", epochs=1, init=str(RunFiles(first.run_dir).weights)))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("0 position tensors not in them" in r.getMessage() for r in caplog.records)
    shallow = replace(_cfg(tiny_data, tmp_path / "d", epochs=1), model=replace(_cfg(tiny_data, "").model, depth=1))
    caplog.clear()
    with caplog.at_level("INFO", logger="reidcli.engine.train"):
        train(replace(shallow, init=str(RunFiles(first.run_dir).weights)))
    assert any("have no place in this model" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
