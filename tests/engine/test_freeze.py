"""--freeze-epochs: the head (BNNecks, ID classifiers) trains alone at first, then the whole model."""

import pytest
import torch
from safetensors.torch import load_file

from reidcli.engine.checkpoint import RunFiles, load_checkpoint
from reidcli.engine.train import TrainConfig, _build, train
from reidcli.errors import ConfigError
from reidcli.losses.combined import LossConfig
from reidcli.model.vit import ModelConfig, ViTReID
from tests.engine.test_train import _cfg as train_cfg

HEAD = ("bottleneck.", "classifier.", "jpm_bottlenecks.", "jpm_classifiers.")


def _cfg(data, run, **kw) -> TrainConfig:
    """test_train's tiny run, with SGD (its step moves every weight it reaches) and the first epoch frozen."""
    frozen = {"loss": LossConfig(spec="ce+triplet"), "freeze_epochs": 1, "optimizer": "sgd", "lr": 0.05}
    return train_cfg(data, run, **{**frozen, "warmup_epochs": 0, **kw})


def test_freeze_backbone_leaves_the_head_learning_and_restores_what_learned():
    cfg = ModelConfig(pe="sincos", image_size=(64, 32), dim=16, depth=2, heads=2, num_classes=3, jpm=True)
    model = ViTReID(cfg).train()
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    model.freeze_backbone(True)
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert now == {n for n in learning if n.startswith(HEAD)} and "classifier.weight" in now
    assert "jpm_classifiers.0.weight" in now and "blocks.0.attn.qkv.weight" not in now
    assert not model.blocks.training and not model.jpm_block.training and not model.patch_embed.training
    assert model.bottleneck.training and model.jpm_bottlenecks.training
    model.train()
    model.freeze_backbone(False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == learning  # BNNeck shifts stay fixed
    assert "bottleneck.bias" not in learning and all(m.training for m in model.modules())


def test_frozen_epochs_move_only_the_head_and_resume_across_the_thaw(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "a")
    init = _build(cfg, 12, torch.device("cpu")).model.state_dict()  # the run's own initial weights (same seed)

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch=stop)
    first = load_checkpoint(RunFiles(tmp_path / "a").checkpoint)["model"]
    for name, value in first.items():
        if name.startswith(HEAD) and value.dtype.is_floating_point and name != "bottleneck.bias":
            assert not torch.equal(value, init[name]), name  # weights, running statistics: the head learned
        elif not name.startswith(HEAD):
            assert torch.equal(value, init[name]), name  # the frozen backbone, bit for bit
    resumed = train(cfg, resume=True)  # epoch 2: the backbone thaws
    assert [m["backbone_frozen"] for m in resumed.metrics] == [True, False]
    straight = train(_cfg(tiny_data, tmp_path / "b"))
    wa, wb = load_file(str(RunFiles(tmp_path / "a").weights)), load_file(str(RunFiles(tmp_path / "b").weights))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert [m["loss"] for m in straight.metrics] == [m["loss"] for m in resumed.metrics]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"freeze_epochs": 2}, "--freeze-epochs 2 must be at least 0 and below --epochs 2"),
        ({"freeze_epochs": -1}, "--freeze-epochs -1 must be at least 0"),
        ({"loss": LossConfig(spec="triplet")}, "only the ce loss reaches; add ce to --loss"),
    ],
)
def test_freeze_refusals(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("d.h5", tmp_path / "r", **kw).validate(weights_file=False)
