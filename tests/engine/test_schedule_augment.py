"""``--schedule step`` (the BoT baseline's multi-step lr) and the augmentation options ``--flip-prob``, ``--pad``,
``--erase-prob``, ``--erase-area``, ``--erase-ratio``, ``--erase-fill``, ``--jitter-prob``, ``--jitter``."""

import json
import re
from dataclasses import replace

import pytest
import torch

from reidcli.data.augment import AUGMENT_DRAWS, AugmentConfig, augment_batch, color_jitter, normalize_batch
from reidcli.engine.train import TrainConfig, lr_at, trajectory_changes
from reidcli.errors import ConfigError
from tests.conftest import TINY_TRAIN, run_cli_here


def test_step_schedule_drops_the_lr_at_each_milestone_after_the_same_warmup():
    cosine = TrainConfig(data="", run_dir="", epochs=10, warmup_epochs=2, lr=1.0)
    step = replace(cosine, schedule="step", milestones=(4, 7), gamma=0.1)
    assert [lr_at(s, 10, step) for s in range(20)] == [lr_at(s, 10, cosine) for s in range(20)]  # the warm-up
    assert lr_at(20, 10, step) == lr_at(39, 10, step) == 1.0  # full lr up to the first milestone's first step
    assert lr_at(40, 10, step) == lr_at(69, 10, step) == pytest.approx(0.1)
    assert lr_at(70, 10, step) == lr_at(99, 10, step) == pytest.approx(0.01)
    assert lr_at(35, 10, replace(step, warmup_epochs=0)) == 1.0 and lr_at(0, 10, replace(step, warmup_epochs=0)) == 1.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"schedule": "linear"}, "unknown --schedule 'linear'; choose one of cosine, step"),
        ({"schedule": "step", "milestones": (7, 4)}, "--milestones 7,4: give increasing epochs from 1 on"),
        ({"schedule": "step", "milestones": (4, 4)}, "--milestones 4,4: give increasing epochs"),
        ({"schedule": "step", "milestones": ()}, "--milestones none: give increasing epochs"),
        ({"schedule": "step", "milestones": (0, 4)}, "--milestones 0,4: give increasing epochs from 1 on"),
        ({"schedule": "step", "milestones": (4, 10)}, "10 is not below --epochs 10, so that step would never happen"),
        ({"schedule": "step", "milestones": (6,), "gamma": 1.0}, "--gamma 1.0 must lie between 0 and 1"),
        ({"schedule": "step", "milestones": (4, 6), "warmup_epochs": 5}, "4 falls inside the --warmup-epochs 5"),
        ({"augment": AugmentConfig(flip=1.5)}, "--flip-prob 1.5 is not a probability"),
        ({"augment": AugmentConfig(erase=-0.1)}, "--erase-prob -0.1 is not a probability"),
        ({"augment": AugmentConfig(pad=-1)}, "--pad -1 cannot be negative"),
        ({"augment": AugmentConfig(erase_fill="black")}, "unknown --erase-fill 'black'; choose one of grey, noise"),
        ({"augment": AugmentConfig(erase_area=(0.5, 0.2))}, "--erase-area 0.5-0.2: give LO-HI with 0 < LO <= HI <= 1"),
        ({"augment": AugmentConfig(erase_area=(0, 0.2))}, "--erase-area 0-0.2: give LO-HI with 0 < LO"),
        ({"augment": AugmentConfig(erase_area=(0.1, 1.5))}, "--erase-area 0.1-1.5: give LO-HI with 0 < LO <= HI <= 1"),
        ({"augment": AugmentConfig(erase_ratio=0)}, "--erase-ratio 0 must lie in (0, 1]: aspect ratios are drawn"),
        ({"augment": AugmentConfig(erase_ratio=3)}, "--erase-ratio 3 must lie in (0, 1]"),
        ({"augment": AugmentConfig(jitter=-0.5)}, "--jitter-prob -0.5 is not a probability"),
        ({"augment": AugmentConfig(jitter_strength=(0.1, -0.1, 0, 0))}, "--jitter 0.1,-0.1,0,0: give four strengths"),
        ({"augment": AugmentConfig(jitter_strength=(0.1, 0.1, 0.1))}, "--jitter 0.1,0.1,0.1: give four strengths"),
        ({"augment": AugmentConfig(jitter_strength=(0, 0, 0, 0.6))}, "the hue's strength is at most 0.5"),
        ({"augment": AugmentConfig(jitter=0.5, jitter_strength=(0, 0, 0, 0))}, "--jitter 0,0,0,0 changes no image"),
    ],
)
def test_bad_schedule_and_augmentation_options(kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        replace(TrainConfig(data="d.h5", run_dir="r", epochs=10), **kw).validate()


def test_resume_names_a_changed_schedule_or_augmentation_and_reads_older_configs():
    saved = TrainConfig(data="d.h5", run_dir="r", epochs=10, schedule="step", milestones=(4, 7))
    changed = replace(saved, milestones=(5, 7), gamma=0.5, augment=AugmentConfig(flip=0.0, pad=4, erase=0.0))
    assert trajectory_changes(saved, changed) == [
        "--flip-prob 0.5 (given 0.0)",
        "--pad 10 (given 4)",
        "--erase-prob 0.5 (given 0.0)",
        "--milestones 4,7 (given 5,7)",
        "--gamma 0.1 (given 0.5)",
    ]
    d = json.loads(json.dumps(saved.to_dict()))  # as config.json holds it: the milestones a list
    assert TrainConfig.from_dict(d) == saved
    new_keys = ("schedule", "milestones", "gamma")
    old = {k: v for k, v in TrainConfig(data="d.h5", run_dir="r").to_dict().items() if k not in new_keys}
    assert TrainConfig.from_dict(old).schedule == "cosine"  # a config.json from before --schedule


def test_augmentation_switched_off_is_the_normalisation_alone():
    images = torch.randint(0, 256, (6, 16, 8, 3), dtype=torch.uint8)
    r = torch.rand(6, 8)
    plain = normalize_batch(images)
    assert torch.equal(augment_batch(images, AugmentConfig(flip=0, pad=0, erase=0), r=r), plain)
    assert torch.equal(augment_batch(images, AugmentConfig(flip=1, pad=0, erase=0), r=r), plain.flip(3))
    erased = augment_batch(images, AugmentConfig(flip=0, pad=0, erase=1), r=r)
    assert ((erased == 0).flatten(1).any(1)).all() and ((erased != plain).flatten(1).any(1)).all()


def _torchvision_jitter(x: torch.Tensor, cfg: AugmentConfig, r: torch.Tensor) -> torch.Tensor:
    """The colour jitter image by image through torchvision's own operations, with the factors and order that ``r``
    draws (as ColorJitter: factors uniform in [max(0, 1 - s), 1 + s], hue in [-s, s], a random order)."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for y, d in zip(x, r.tolist(), strict=True):
        if d[0] < cfg.jitter:
            b, c, s, h = cfg.jitter_strength
            f = [max(0, 1 - v) + (1 + v - max(0, 1 - v)) * d[1 + i] for i, v in enumerate((b, c, s))] + [
                h * (2 * d[4] - 1)
            ]
            ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
            for i in torch.tensor(d[5:9]).argsort().tolist():
                y = ops[i](y, f[i])
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("static_shapes", [True, False])
def test_colour_jitter_is_torchvisions_operations_in_each_images_own_order(static_shapes):
    """Both ways (the whole batch through every operation, kept per image, as a CUDA graph needs; or each operation
    on its images only) give torchvision's brightness, contrast, saturation and hue adjustments, in the drawn order
    with the drawn factors, to float rounding; grey pixels, saturated pixels and pure hues included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 12, 6, generator=gen)
    x[0, :, :4] = 0.5  # grey: no hue
    x[1, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0])  # two channels tie at the top
    x[2, :, 1] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    x[3] = 0.0
    cfg = AugmentConfig(jitter=0.7, jitter_strength=(0.4, 0.4, 1.2, 0.5))  # saturation down to 0: grey images too
    r = torch.rand(48, 9, generator=gen)
    out = color_jitter(x.clone(), cfg, r, static_shapes=static_shapes)
    expected = _torchvision_jitter(x, cfg, r)
    assert (out - expected).abs().max() < 1e-5
    kept = r[:, 0] >= cfg.jitter
    assert kept.any() and torch.equal(out[kept], x[kept]) and (out[~kept] != x[~kept]).flatten(1).any(1).all()
    # one operation switched off (strength 0) is left out of every order
    no_hue = AugmentConfig(jitter=1.0, jitter_strength=(0.3, 0.3, 0.3, 0.0))
    assert (color_jitter(x.clone(), no_hue, r, static_shapes) - _torchvision_jitter(x, no_hue, r)).abs().max() < 1e-5


def test_jitter_takes_draws_of_its_own_and_runs_without_it_draw_as_before():
    """Without jitter an image takes the 8 numbers it took before the option existed (runs and resumes keep their
    trajectory); with it, 9 more, and an image the jitter skips gets exactly what it gets with jitter off."""
    assert AugmentConfig().draws == AUGMENT_DRAWS == 8 and AugmentConfig(jitter=0.5).draws == 17
    images = torch.randint(0, 256, (32, 16, 8, 3), dtype=torch.uint8)
    r = torch.rand(32, 17)
    plain = augment_batch(images, AugmentConfig(pad=2), r=r[:, :8])  # (a 10-pixel pad could crop all border)
    jittered = augment_batch(images, AugmentConfig(pad=2, jitter=0.5), r=r)
    skipped = r[:, 8] >= 0.5
    assert skipped.any() and (~skipped).any()
    assert torch.equal(jittered[skipped], plain[skipped])
    assert (jittered[~skipped] != plain[~skipped]).flatten(1).any(1).all()
    assert jittered.min() >= -1 and jittered.max() <= 1  # the jitter clamps to the pixel range before normalising


def test_erasing_draws_its_rectangle_from_the_area_and_aspect_ranges():
    """A fixed area and aspect give every image the same rectangle size (a 32 × 32 image, a quarter of its area,
    square: 16 × 16 pixels, wherever it lands); ranges give areas inside them, and both aspects of a ratio range."""
    images = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)  # 1.0 after normalisation: erased pixels are 0
    r = torch.rand(64, 8)
    fixed = AugmentConfig(flip=0, pad=0, erase=1, erase_area=(0.25, 0.25), erase_ratio=1.0)
    erased = augment_batch(images, fixed, r=r) == 0
    assert (erased.sum((1, 2, 3)) == 3 * 16 * 16).all()
    assert (erased.any(3).sum(2) == 16).all() and (erased.any(2).sum(2) == 16).all()  # 16 rows, 16 columns
    ranged = AugmentConfig(flip=0, pad=0, erase=1, erase_area=(0.1, 0.2), erase_ratio=0.5)
    erased = augment_batch(images, ranged, r=r) == 0
    share = erased[:, 0].sum((1, 2)) / (32 * 32)
    assert (share > 0.1 * 0.8).all() and (share < 0.2 * 1.25).all()  # whole pixels round the rectangle's sides
    tall = erased[:, 0].any(2).sum(1) > erased[:, 0].any(1).sum(1)
    assert tall.any() and (~tall).any()


def test_noise_erasing_fills_the_rectangle_with_the_generators_normal_draws():
    images = torch.randint(0, 256, (6, 16, 8, 3), dtype=torch.uint8)
    r = torch.rand(6, 8)
    cfg = AugmentConfig(flip=0, pad=0, erase=1)
    grey = augment_batch(images, cfg, r=r)
    torch.manual_seed(3)
    noisy = augment_batch(images, replace(cfg, erase_fill="noise"), r=r)
    torch.manual_seed(3)
    draws = torch.randn(6, 3, 16, 8)
    erased = grey != normalize_batch(images)  # the rectangles (grey: exactly 0 there)
    assert erased.flatten(1).any(1).all() and (grey[erased] == 0).all()
    assert torch.equal(noisy[erased], draws[erased]) and torch.equal(noisy[~erased], grey[~erased])
    assert 0.8 < noisy[erased].std() < 1.2


def test_cli_step_schedule_and_augmentation_reach_the_run_and_resume_keeps_them(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ("train", "--data", str(tiny_data), "--out", str(run), *TINY_TRAIN, "--warmup-epochs", "0")
    steps = ("--schedule", "step", "--milestones", "1", "--gamma", "0.5", "--epochs", "2")
    augment = ("--flip-prob", "0", "--pad", "4", "--erase-prob", "0.25", "--erase-fill", "noise")
    augment += ("--erase-area", "0.1-0.2", "--erase-ratio", "0.5", "--jitter-prob", "0.5", "--jitter", "0.2,0.1,0.1,0")
    r = run_cli_here(*args, *steps, *augment, "--json")
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["schedule"], config["milestones"], config["gamma"]) == ("step", [1], 0.5)
    assert [config["augment"][key] for key in ("flip", "pad", "erase", "erase_fill")] == [0.0, 4, 0.25, "noise"]
    assert (config["augment"]["erase_area"], config["augment"]["erase_ratio"]) == ([0.1, 0.2], 0.5)
    assert (config["augment"]["jitter"], config["augment"]["jitter_strength"]) == (0.5, [0.2, 0.1, 0.1, 0])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == [1e-3, 5e-4]  # each epoch's last step: before and after the milestone
    for extra, message in [
        (("--gamma", "0.2"), "was trained with --gamma 0.5 (given 0.2)"),
        (("--pad", "10"), "was trained with --pad 4 (given 10)"),
        (("--erase-fill", "grey"), "was trained with --erase-fill noise (given grey)"),
        (("--erase-area", "0.1-0.3"), "was trained with --erase-area 0.1-0.2 (given 0.1-0.3)"),
        (("--erase-ratio", "0.3"), "was trained with --erase-ratio 0.5 (given 0.3)"),
        (("--jitter", "0.2,0.1,0.1,0.1"), "was trained with --jitter 0.2,0.1,0.1,0 (given 0.2,0.1,0.1,0.1)"),
        (("--jitter-prob", "0"), "was trained with --jitter-prob 0.5 (given 0.0)"),
        (("--schedule", "cosine"), "was trained with --schedule step (given cosine)"),
    ]:
        r = run_cli_here("train", "--out", str(run), "--resume", "--epochs", "3", *extra)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--milestones", "3"), "--milestones has no effect without --schedule step; leave it out or add --schedule"),
        (("--milestones", "3", "--gamma", "0.5"), "--milestones, --gamma have no effect without --schedule step"),
        (("--schedule", "step", "--milestones", "3,x"), "--milestones '3,x' must be comma-separated epochs"),
        (("--schedule", "step"), "--milestones 40,70: 70 is not below --epochs 2"),
        (("--erase-prob", "2"), "--erase-prob 2.0 is not a probability"),
        (("--erase-prob", "0", "--erase-fill", "noise"), "--erase-fill has no effect without --erase-prob above 0"),
        (("--erase-fill", "black"), "unknown --erase-fill 'black'"),
        (("--erase-area", "0.4"), "--erase-area '0.4' must be LO-HI, shares of the image's area, e.g. 0.02-0.4"),
        (("--erase-area", "0.4-0.1"), "--erase-area 0.4-0.1: give LO-HI with 0 < LO <= HI <= 1"),
        (("--erase-prob", "0", "--erase-ratio", "0.5"), "--erase-ratio has no effect without --erase-prob above 0"),
        (("--jitter", "0.3,0.3,0.3,0.1"), "--jitter has no effect without --jitter-prob above 0; leave it out or add"),
        (("--jitter-prob", "0.5", "--jitter", "0.3,0.3"), "--jitter '0.3,0.3' must be four comma-separated strengths"),
        (("--jitter-prob", "0.5", "--jitter", "0,0,0,0.8"), "--jitter 0,0,0,0.8: the hue's strength is at most 0.5"),
    ],
)
def test_cli_refuses_schedule_and_augmentation_mistakes_before_any_work(tiny_data, tmp_path, extra, message):
    args = ("train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), *TINY_TRAIN, "--epochs", "2")
    r = run_cli_here(*args, *extra)
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_bias_lr_factor_puts_the_biases_in_a_group_of_their_own():
    from reidcli.engine.train import _param_groups
    from reidcli.model.vit import ModelConfig, ViTReID

    small = {"image_size": (32, 16), "patch_size": 8, "stride": 8, "dim": 16, "depth": 2, "heads": 2}
    model = ViTReID(ModelConfig(pe="both", num_classes=3, **small))
    plain = _param_groups(model, 1e-4)
    assert len(plain) == 2 and all("lr_scale" not in g for g in plain)  # as before the option: checkpoints resume
    decay, no_decay, biases = _param_groups(model, 1e-4, 2.0)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}  # the BNNeck's bias is frozen
    assert {names[id(p)] for p in biases["params"]} == {n for n in names.values() if n.endswith(".bias")}
    assert (biases["lr_scale"], biases["weight_decay"], no_decay["weight_decay"]) == (2.0, 0.0, 0.0)
    assert [id(p) for p in decay["params"]] == [id(p) for p in plain[0]["params"]]  # the decayed weights unchanged
    assert len(no_decay["params"]) + len(biases["params"]) == len(plain[1]["params"])


def test_cli_bias_lr_factor_scales_the_biases_lr_every_step_and_resume_keeps_it(tiny_data, tmp_path):
    from reidcli.engine.checkpoint import RunFiles, load_checkpoint

    run = tmp_path / "run"
    args = ("train", "--data", str(tiny_data), "--out", str(run), *TINY_TRAIN, "--warmup-epochs", "0")
    r = run_cli_here(*args, "--epochs", "2", "--bias-lr-factor", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["bias_lr_factor"] == 2.0
    groups = load_checkpoint(RunFiles(run).checkpoint)["optimizer"]["param_groups"]
    last_lr = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert [g["lr"] for g in groups] == pytest.approx([last_lr, last_lr, 2 * last_lr])
    r = run_cli_here("train", "--out", str(run), "--resume", "--epochs", "3", "--bias-lr-factor", "1")
    assert r.returncode == 1 and "was trained with --bias-lr-factor 2.0 (given 1.0)" in r.stderr, r.stderr
    r = run_cli_here(*args[:-2], "--out", str(tmp_path / "x"), "--bias-lr-factor", "0")
    assert r.returncode == 1 and "--bias-lr-factor 0 must be positive" in r.stderr and not (tmp_path / "x").exists()
