import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from reidcli.engine.train import TrainConfig
from reidcli.losses.combined import LossConfig
from reidcli.model.vit import ModelConfig
from reidcli.report.ablate import AblationConfig, plan, run_ablation
from tests.conftest import TINY_TRAIN, run_cli, run_cli_here

TINY = ("--preset", "vit_tiny", *TINY_TRAIN, "--warmup-epochs", "0")


def _cfg(data, out, **kw) -> AblationConfig:
    template = TrainConfig(
        data=str(data),
        run_dir="",
        model=ModelConfig(image_size=(64, 32), dim=32, depth=1, heads=4),
        loss=LossConfig(top_n=4),
        epochs=1,
        batch=16,
        k=4,
        optimizer="adamw",
        lr=1e-3,
        warmup_epochs=0,
        device="cpu",
    )
    return replace(AblationConfig(out=str(out), template=template, pes=("ape", "rpe"), seeds=(0, 1)), **kw)


def test_two_variants_two_seeds_then_full_reuse(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data, tmp_path / "abl")
    summary = run_ablation(cfg)
    assert [r["variant"] for r in summary] == ["ape · ce+triplet", "rpe · ce+triplet"]
    for r in summary:
        assert r["runs"] == 2
        for col in (
            "mAP",
            "Rank-1",
            "Rank-5",
            "Rank-10",
            "mINP",
            "mAP shifted",
            "PE params",
            "PE share",
            "train img/s",
            "final loss",
            "mAP std",
        ):
            assert r[col] == r[col], col  # filled, not NaN
    assert summary[0]["PE params"] == (4 * 2 + 1) * 32 and summary[1]["PE params"] == 1 * 4 * (7 * 3 + 3)
    # rpe against ape, query by query over both seeds: the difference of the mean mAPs, inside its interval
    assert "ΔmAP" not in summary[0]
    assert summary[1]["ΔmAP"] == pytest.approx(summary[1]["mAP"] - summary[0]["mAP"], abs=1e-12)
    assert summary[1]["ΔmAP low"] <= summary[1]["ΔmAP"] <= summary[1]["ΔmAP high"]
    csv = pd.read_csv(tmp_path / "abl" / "results.csv")
    assert len(csv) == 2 and "mAP" in csv
    md = (tmp_path / "abl" / "results.md").read_text()
    assert md.count("\n") == 4 and "| ape · ce+triplet |" in md and "| ΔmAP |" in md
    assert f"| {100 * summary[1]['ΔmAP']:+.1f} [{100 * summary[1]['ΔmAP low']:+.1f}, " in md
    pictures = {p.name for p in (tmp_path / "abl" / "pictures").iterdir()}
    assert {
        "curves_ape__ce-triplet.png",
        "ape_similarity_ape__ce-triplet.png",
        "rpe_bias_rpe__ce-triplet.png",
        "relation_vectors_rpe__ce-triplet.png",
        "ranked_ape__ce-triplet.png",
        "summary.png",
    } <= pictures
    runs = pd.read_csv(tmp_path / "abl" / "runs.csv")  # each run's queries, for 'reid compare RUN RUN'
    assert len(runs) == 4
    for run, m_ap in zip(runs["run"], runs["mAP"], strict=True):
        assert abs(pd.read_csv(Path(run) / "per_query.csv")["AP"].mean() - m_ap) < 1e-9
    r = run_cli("compare", runs["run"].iloc[0], runs["run"].iloc[-1], "--json", "--resamples", "1000")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"][0]["A"] == pytest.approx(runs["mAP"].iloc[0], abs=1e-12)

    import reidcli.engine.train as engine

    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert run_ablation(cfg) == summary


def test_changed_options_do_not_reuse_runs(tiny_data, tmp_path):
    a = plan(_cfg(tiny_data, tmp_path))
    b = plan(_cfg(tiny_data, tmp_path, template=replace(_cfg(tiny_data, tmp_path).template, lr=2e-3)))
    assert {v.run_dir for v in a}.isdisjoint({v.run_dir for v in b})


def test_run_keys_made_before_precision_existed_still_match():
    """Ablation folders are keyed by a hash of the resolved config; adding ``--precision`` (default auto) must not
    re-key them. The literal is what commit 5b81d0b, before the option, computed for this config."""
    from reidcli.report.ablate import _config_hash

    cfg = TrainConfig(data="d.h5", run_dir="r")
    assert _config_hash(cfg) == "b559588e37"
    assert _config_hash(replace(cfg, precision="bf16")) != _config_hash(replace(cfg, precision="fp32")) != "b559588e37"


def test_cli_dry_run_and_table(tiny_data, tmp_path):
    out = tmp_path / "abl"
    args = ("ablate", "--data", str(tiny_data), "--out", str(out), "--pe", "none,ape", "--epochs", "1", *TINY)
    r = run_cli_here(*args, "--dry-run")
    assert r.returncode == 0 and r.stdout.count("train") >= 2
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "none · ce+triplet" in r.stdout and "ape · ce+triplet" in r.stdout and "PE share" in r.stdout
    r = run_cli_here(*args, "--dry-run", "--json")
    assert r.stdout.count('"reuse"') == 2
    frozen = run_cli_here(*args, "--epochs", "2", "--freeze-epochs", "1", "--dry-run", "--json")
    thawed = run_cli_here(*args, "--epochs", "2", "--dry-run", "--json")  # --freeze-epochs is part of a run's key
    names = [{p["run"] for p in json.loads(r.stdout)} for r in (frozen, thawed)]
    assert len(names[0]) == len(names[1]) == 2 and not names[0] & names[1]
    # the loss weights and run options of `reid train` reach every run (and its key: not reused)
    loss = ("--loss", "ce+triplet+rp-triplet", "--label-smoothing", "0.1", "--rp-weight", "0.5", "--ce-weight", "2")
    loss += ("--triplet-weight", "0.25")
    r = run_cli(*args, "--pe", "ape", *loss, "--eval-every", "1", "--json")
    assert r.returncode == 0, r.stderr
    (run,) = [d for d in (out / "runs").iterdir() if json.loads((d / "config.json").read_text())["eval_every"] == 1]
    config = json.loads((run / "config.json").read_text())
    assert config["eval_every"] == 1 and config["loss"]["label_smoothing"] == 0.1 and config["loss"]["rp_weight"] == 0.5
    assert (config["loss"]["ce_weight"], config["loss"]["triplet_weight"]) == (2.0, 0.25)
    assert "eval_mAP" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_killed_ablation_finishes_only_the_missing_runs(tiny_data, tmp_path):
    out = tmp_path / "abl"
    args = [
        sys.executable,
        "-m",
        "reidcli",
        "ablate",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--pe",
        "ape,rpe",
        "--epochs",
        "3",
        *TINY,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("runs/*/DONE")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    done = list(out.glob("runs/*/DONE"))
    assert len(done) == 1
    first_run = done[0].parent
    stamp = (first_run / "model.safetensors").stat().st_mtime_ns
    assert not list(out.rglob(".*.tmp"))  # nothing half-written
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("runs/*/DONE"))) == 2
    assert (first_run / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert Path(out / "results.md").is_file()


def test_summary_picture_panels(tmp_path):
    """mAP/Rank-1 bars, ΔmAP intervals and loss curves; a fourth panel when the runs evaluated during training."""
    from matplotlib.image import imread

    from reidcli.report.plots import plot_ablation_summary

    summary = [
        {"variant": "ape · ce", "mAP": 0.30, "Rank-1": 0.40, "runs": 2, "mAP std": 0.01, "Rank-1 std": 0.02},
        {"variant": "rpe · ce", "mAP": 0.20, "Rank-1": 0.30, "runs": 2, "ΔmAP": -0.1, "ΔmAP low": -0.12,
         "ΔmAP high": -0.08},
    ]  # fmt: skip
    curves = {v["variant"]: [[{"epoch": e, "loss": 3.0 - e} for e in (1, 2)]] * 2 for v in summary}
    plot_ablation_summary(summary, curves, tmp_path / "a.png")
    curves["ape · ce"][0][-1]["eval_mAP"] = 0.3
    plot_ablation_summary(summary, curves, tmp_path / "b.png")
    a, b = imread(tmp_path / "a.png"), imread(tmp_path / "b.png")
    assert a.shape[0] == b.shape[0] and b.shape[1] > 1.2 * a.shape[1]  # one more panel
    assert a[..., :3].std() > 0.05  # something drawn, not a blank canvas


@pytest.mark.parametrize(("field", "values"), [("pes", ("ape", "rpe", "ape")), ("seeds", (0, 1, 0))])
def test_a_value_listed_twice_is_refused(tiny_data, tmp_path, field, values):
    """Both entries would map to one run folder, counted as two seeds (std 0) or two rows of one variant."""
    from reidcli.errors import ConfigError

    with pytest.raises(ConfigError, match="more than once"):
        _cfg(tiny_data, tmp_path, **{field: values}).validate()


def test_vary_plans_one_variant_per_setting_and_refuses_what_it_cannot_sweep(tmp_path):
    from reidcli.errors import ConfigError
    from reidcli.report.ablate import parse_vary

    vary = (parse_vary("lr=1e-3,3e-3"), parse_vary("--drop-path=0,0.2"), parse_vary("margin=none,0.3"))
    cfg = _cfg("d.h5", tmp_path / "abl", pes=("ape",), seeds=(0,), vary=vary)
    variants = plan(cfg)
    assert len(variants) == 8 and len({v.run_dir for v in variants}) == 8
    first, last = variants[0], variants[-1]
    assert first.label == "ape · ce+triplet · lr 1e-3 · drop-path 0 · margin none"
    assert first.run_dir.name.startswith("ape__ce-triplet__lr-1e-3__drop-path-0__margin-none__s0__")
    assert (first.train.lr, first.train.model.drop_path, first.train.loss.margin) == (1e-3, 0.0, None)
    assert (last.train.lr, last.train.model.drop_path, last.train.loss.margin) == (3e-3, 0.2, 0.3)
    assert isinstance(replace(cfg, vary=(parse_vary("batch=8,16"),)).validate().vary[0][1][0], str)
    assert [v.train.batch for v in plan(replace(cfg, vary=(parse_vary("batch=8,16"),)))] == [8, 16]
    for text, message in [
        ("lr", "give OPTION=V1,V2"),
        ("pe=ape,rpe", "--pe, --loss and --seeds have options of their own"),
        ("id-head=arcface", "--vary cannot sweep 'id-head'; it sweeps batch, bias-lr-factor, ce-weight"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_vary(text)
    with pytest.raises(ConfigError, match="--vary batch=eight: not a int"):
        plan(replace(cfg, vary=(parse_vary("batch=eight"),)))
    with pytest.raises(ConfigError, match="--vary lr lists 0.1 more than once"):
        replace(cfg, vary=(parse_vary("lr=0.1,0.1"),)).validate()
    with pytest.raises(ConfigError, match="--vary names one option twice"):
        replace(cfg, vary=(parse_vary("lr=0.1"), parse_vary("lr=0.2"))).validate()


def test_cli_vary_trains_each_setting_into_one_table(tiny_data, tmp_path):
    out = tmp_path / "abl"
    args = ("ablate", "--data", str(tiny_data), "--out", str(out), "--pe", "ape", "--epochs", "1", *TINY)
    r = run_cli_here(*args, "--vary", "weight-decay=0,0.5", "--json")
    assert r.returncode == 0, r.stderr
    labels = [row["variant"] for row in json.loads(r.stdout)]
    assert labels == ["ape · ce+triplet · weight-decay 0", "ape · ce+triplet · weight-decay 0.5"]
    results = pd.read_csv(out / "results.csv")
    assert list(results["weight-decay"]) == [0, 0.5] and results["ΔmAP"].notna().tolist() == [False, True]
    configs = [json.loads(p.read_text())["weight_decay"] for p in sorted((out / "runs").glob("*/config.json"))]
    assert sorted(configs) == [0.0, 0.5]
    assert len(list((out / "pictures").glob("ranked_ape__ce-triplet__weight-decay-*.png"))) == 2
    for extra, message in [
        (("--vary", "rp-weight=1,2"), "--vary rp-weight has no effect without rp-triplet in --loss"),
        (("--vary", "lr=1e-3,1e-2"), "--lr is set per variant by --vary lr; leave --lr out"),  # TINY sets --lr
        (("--vary", "jpm-groups=2,4"), "--vary jpm-groups has no effect without --jpm"),
    ]:
        r = run_cli_here(*args, *extra)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_vary_sweeps_augmentation_and_the_schedule_and_keeps_the_default_runs_key(tmp_path):
    from reidcli.report.ablate import _config_hash, parse_vary

    base = _cfg("d.h5", tmp_path / "abl", pes=("ape",), seeds=(0,))
    base = replace(base, template=replace(base.template, epochs=3, milestones=(1, 2)))
    plain = _config_hash(plan(base)[0].train)
    cfg = replace(base, vary=(parse_vary("erase-prob=0,0.5"), parse_vary("pad=0,10")))
    variants = plan(cfg)
    assert [(v.train.augment.erase, v.train.augment.pad) for v in variants] == [(0, 0), (0, 10), (0.5, 0), (0.5, 10)]
    assert variants[1].label == "ape · ce+triplet · erase-prob 0 · pad 10"
    assert [_config_hash(v.train) == plain for v in variants] == [False, False, False, True]  # the defaults: reused
    cfg = replace(base, vary=(parse_vary("schedule=cosine,step"), parse_vary("flip-prob=0.5,1")))
    variants = plan(cfg)
    assert [(v.train.schedule, v.train.augment.flip) for v in variants] == [
        ("cosine", 0.5),
        ("cosine", 1.0),
        ("step", 0.5),
        ("step", 1.0),
    ]
    assert _config_hash(variants[0].train) == plain and variants[2].train.milestones == (1, 2)
    assert len({_config_hash(v.train) for v in variants}) == 4
    noise = replace(base.template, augment=replace(base.template.augment, erase_fill="noise"))
    assert _config_hash(noise) != plain
    with pytest.raises(Exception, match="--vary flip-prob=x: not a float"):
        plan(replace(base, vary=(parse_vary("flip-prob=x"),)))
    cfg = replace(base, vary=(parse_vary("erase-area=0.02-0.4,0.1-0.2"), parse_vary("erase-ratio=0.3,1")))
    variants = plan(cfg)
    assert [(v.train.augment.erase_area, v.train.augment.erase_ratio) for v in variants] == [
        ((0.02, 0.4), 0.3),
        ((0.02, 0.4), 1.0),
        ((0.1, 0.2), 0.3),
        ((0.1, 0.2), 1.0),
    ]
    assert variants[2].label == "ape · ce+triplet · erase-area 0.1-0.2 · erase-ratio 0.3"
    assert [_config_hash(v.train) == plain for v in variants] == [True, False, False, False]
    variants = plan(replace(base, vary=(parse_vary("bias-lr-factor=1,2"),)))
    assert [v.train.bias_lr_factor for v in variants] == [1.0, 2.0] and _config_hash(variants[0].train) == plain
    assert _config_hash(variants[1].train) != plain
    # a finished plain run is the default-valued variant's training: reused from its folder, not trained again
    plain_dir = plan(base)[0].run_dir
    plain_dir.mkdir(parents=True)
    assert plan(replace(base, vary=(parse_vary("bias-lr-factor=1,2"),)))[0].run_dir != plain_dir  # not finished
    (plain_dir / "DONE").write_text("")
    twins = plan(replace(base, vary=(parse_vary("bias-lr-factor=1,2"),)))
    assert twins[0].run_dir == plain_dir and twins[1].run_dir.name.startswith("ape__ce-triplet__bias-lr-factor-2__")
    assert twins[0].label == "ape · ce+triplet · bias-lr-factor 1"  # the table still names the setting
    with pytest.raises(Exception, match="--erase-area '0.4' must be LO-HI"):
        plan(replace(base, vary=(parse_vary("erase-area=0.4"),)))
    variants = plan(replace(base, vary=(parse_vary("jitter-prob=0,0.5"),)))  # off: the key from before the jitter
    assert [v.train.augment.jitter for v in variants] == [0.0, 0.5] and _config_hash(variants[0].train) == plain
    strong = replace(base.template, augment=replace(base.template.augment, jitter=0.5, jitter_strength=(0.3,) * 4))
    assert len({plain, _config_hash(variants[1].train), _config_hash(strong)}) == 3
    with pytest.raises(Exception, match="--vary cannot sweep 'jitter'"):  # four numbers a value: give --jitter
        parse_vary("jitter=0.1,0.1,0.1,0.1")


def test_cli_ablate_refuses_schedule_sweeps_that_train_one_model_twice(tiny_data, tmp_path):
    args = ("ablate", "--data", str(tiny_data), "--out", str(tmp_path / "abl"), "--pe", "ape", "--epochs", "3", *TINY)
    ok = run_cli_here(*args, "--vary", "schedule=cosine,step", "--milestones", "1,2", "--dry-run", "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2, ok.stderr
    ok = run_cli_here(*args, "--schedule", "step", "--milestones", "2", "--vary", "gamma=0.1,0.5", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    ok = run_cli_here(*args, "--vary", "jitter-prob=0,0.5", "--jitter", "0.3,0.3,0.2,0.1", "--dry-run", "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2, ok.stderr  # --jitter acts in the 0.5 variant
    for extra, message in [
        (("--vary", "gamma=0.1,0.5"), "--vary gamma has no effect without --schedule step"),
        (("--vary", "gamma=0.1,0.5", "--vary", "schedule=cosine,step"), "trains each cosine variant once per gamma"),
        (("--gamma", "0.5"), "--gamma has no effect without --schedule step"),
        (("--vary", "pad=0,10", "--pad", "4"), "--pad is set per variant by --vary pad; leave --pad out"),
        (("--erase-prob", "0", "--vary", "erase-fill=grey,noise"), "--vary erase-fill has no effect without --erase-p"),
        (("--erase-prob", "0", "--vary", "erase-ratio=0.3,1"), "--vary erase-ratio has no effect without --erase-p"),
        (("--jitter", "0.3,0.3,0.2,0.1"), "--jitter has no effect without --jitter-prob above 0"),
    ]:
        r = run_cli_here(*args, *extra, "--dry-run")
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another synthetic 'domain' at the tiny dataset's 64×32: other identities, cameras and seed."""
    from reidcli.data.prepare import PrepareConfig, prepare_dataset
    from reidcli.data.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("other")
    config = SyntheticConfig(num_train_ids=3, num_test_ids=6, num_distractors=2, num_junk=0, images_per_camera=1,
                             num_cameras=3, seed=7)  # fmt: skip
    generate_synthetic(root / "raw", config)
    prepare_dataset(PrepareConfig("synthetic", root / "raw", root / "other_domain.h5", image_size=(64, 32)))
    return root / "other_domain.h5"


def test_test_data_adds_a_direct_transfer_column_and_reuses_finished_runs(tiny_data, other_data, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    from reidcli.engine.checkpoint import load_run_model
    from reidcli.engine.extract import embed_dataset
    from reidcli.retrieval.evaluate import EvalConfig, evaluate

    out = tmp_path / "abl"
    (plain,) = run_ablation(_cfg(tiny_data, out, pes=("ape",), seeds=(0,)))
    assert not any(k.startswith("mAP → ") for k in plain)

    import reidcli.engine.train as engine

    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    (row,) = run_ablation(_cfg(tiny_data, out, pes=("ape",), seeds=(0,), test_data=(str(other_data),)))
    assert row["mAP"] == plain["mAP"]  # the finished run, only evaluated on the other dataset
    (run,) = (out / "runs").iterdir()
    import torch

    model, _, _ = load_run_model(run, torch.device("cpu"))
    feats = embed_dataset(model, other_data, ("query", "gallery"), torch.device("cpu"))
    by_hand = evaluate(feats["query"], feats["gallery"], EvalConfig(engine="torch", device="cpu")).metrics
    assert row["mAP → other_domain"] == pytest.approx(by_hand.mAP, abs=1e-12) and 0 < by_hand.mAP <= 1
    assert row["Rank-1 → other_domain"] == pytest.approx(by_hand.cmc[0], abs=1e-12)
    header = (out / "results.md").read_text().splitlines()[0]
    assert "| mAP shifted | mAP → other_domain | PE params |" in header and "Rank-1 →" not in header
    assert "Rank-1 → other_domain" in pd.read_csv(out / "results.csv")
    # asked no more: the column leaves the table, its numbers stay with the run for the next ablation that asks
    (again,) = run_ablation(_cfg(tiny_data, out, pes=("ape",), seeds=(0,)))
    assert "mAP → other_domain" not in again and "mAP → other_domain" not in (out / "results.md").read_text()
    assert json.loads((run / "results.json").read_text())["mAP → other_domain"] == row["mAP → other_domain"]
    # the plan says which finished runs will only be evaluated, and on what
    import shutil

    from reidcli.cli.ablate import _print_plan

    copy = shutil.copy(other_data, tmp_path / "copy_domain.h5")
    _print_plan(plan(_cfg(tiny_data, out, pes=("ape",), seeds=(0,))), True, (str(other_data), str(copy)))
    (step,) = json.loads(capsys.readouterr().out)
    assert step["action"] == "reuse + evaluate on copy_domain"


def test_test_data_refusals(tiny_data, other_data, tmp_path):
    from reidcli.errors import ConfigError, FormatError

    cfg = _cfg(tiny_data, tmp_path, pes=("ape",), seeds=(0,))
    sie = replace(cfg.template, model=replace(cfg.template.model, sie_cameras=6))
    cases = [
        (dict(test_data=(str(tiny_data),)), ConfigError, "is --data itself"),
        (dict(test_data=(str(other_data), str(other_data))), ConfigError, "names other_domain twice"),
        (dict(test_data=(str(other_data),), template=sie), ConfigError, "--test-data with --sie"),
        (dict(test_data=(str(tmp_path / "nope.h5"),)), FormatError, "not found"),
        (
            dict(
                test_data=(str(other_data),),
                template=replace(cfg.template, model=replace(cfg.template.model, image_size=(32, 16))),
            ),
            ConfigError,
            "holds 64x32 images but the models take 32x16",
        ),  # fmt: skip
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            replace(cfg, **changes).validate()
    r = run_cli_here("ablate", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--test-data",
                     str(tmp_path / "nope.h5"), *TINY)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope.h5 not found" in r.stderr
    assert not (tmp_path / "a" / "runs").exists()
