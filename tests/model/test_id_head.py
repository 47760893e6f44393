"""``--id-head cosface|arcface|circle``: cosine ID logits with a margin on the label (fast-reid's heads)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from reidcli.errors import ConfigError
from reidcli.losses.combined import LossConfig, compute_losses, margin_logits
from reidcli.model.vit import ModelConfig, ViTReID
from tests.conftest import TINY_MODEL, run_cli, run_cli_here

SMALL = {"image_size": (32, 16), "patch_size": 8, "stride": 8, "dim": 16, "depth": 1, "heads": 2, "drop_path": 0.0}


def test_margin_logits_by_hand():
    cos, labels = torch.tensor([[0.5, 0.2], [-0.9, 0.3]]), torch.tensor([0, 0])
    torch.testing.assert_close(
        margin_logits(cos, labels, "cosface", 10.0, 0.1), torch.tensor([[4.0, 2.0], [-10.0, 3.0]])
    )
    arc = margin_logits(cos, labels, "arcface", 10.0, 0.1)
    # the label's logit: s·cos(θ + m) while θ + m ≤ π (cos −0.9 is above cos(π − 0.1) = −0.995); the others as given
    torch.testing.assert_close(arc[:, 1], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(arc[0, 0], torch.tensor(10 * math.cos(math.acos(0.5) + 0.1)))
    torch.testing.assert_close(arc[1, 0], torch.tensor(10 * math.cos(math.acos(-0.9) + 0.1)))
    past = margin_logits(torch.tensor([[-0.999, 0.0]]), torch.tensor([0]), "arcface", 1.0, 0.1)
    assert past[0, 0].item() == pytest.approx(-0.999 - 0.1 * math.sin(0.1), abs=1e-6)  # past π: cos − m·sin m
    circle = margin_logits(cos, labels, "circle", 10.0, 0.1)
    # label: α_p = 1.1 − 0.5 = 0.6, 0.6·(0.5 − 0.9) = −0.24; other: α_n = 0.3, 0.3·(0.2 − 0.1) = 0.03
    torch.testing.assert_close(circle[0], torch.tensor([-2.4, 0.3]))
    assert torch.equal(margin_logits(cos, labels, "linear", 10.0, 0.1), cos)


@pytest.mark.parametrize("head", ["cosface", "arcface", "circle"])
def test_a_cosine_head_gives_cosines_and_its_loss_is_the_margin_ce(head):
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe="both", num_classes=5, id_head=head, head_scale=16.0, head_margin=0.2, **SMALL))
    x, labels = torch.randn(6, 3, 32, 16), torch.tensor([0, 0, 1, 1, 4, 4])
    out = model(x)
    expected = F.normalize(model.bottleneck(out.feat), dim=1) @ F.normalize(model.classifier.weight, dim=1).T
    torch.testing.assert_close(out.logits, expected)
    assert out.logits.abs().max() <= 1 + 1e-6 and set(model.state_dict()) >= {"classifier.weight"}
    losses = compute_losses(model, out, labels, LossConfig(spec="ce"))
    want = F.cross_entropy(margin_logits(out.logits, labels, head, 16.0, 0.2), labels)
    torch.testing.assert_close(losses["ce"], want)
    losses["ce"].backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="unknown --id-head 'softmax'"):
        ModelConfig(id_head="softmax").validate()


def test_train_with_a_circle_head_through_the_cli(tiny_data, tmp_path):
    out = tmp_path / "circle"
    r = run_cli("train", "--data", str(tiny_data), "--out", str(out), "--pe", "rpe", *TINY_MODEL, "--batch", "16",
                "--epochs", "1", "--id-head", "circle", "--device", "cpu", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads(r.stdout)["last"]["loss"])
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["id_head"], model["head_scale"], model["head_margin"]) == ("circle", 64.0, 0.35)
    r = run_cli_here(
        "train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), *TINY_MODEL, "--head-margin", "0.2"
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--head-margin has no effect without a cosine --id-head" in r.stderr
    from typer.testing import CliRunner

    from reidcli.cli.app import app

    for args, message in (  # the same command line, in this process
        (("--id-head", "cosface", "--loss", "triplet"), "--id-head has no effect without ce in --loss"),
        (("--id-head", "cosface", "--head-margin", "1.5"), "--head-margin 1.5 in [0, 1)"),
    ):
        got = CliRunner().invoke(
            app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), *TINY_MODEL, *args]
        )
        assert isinstance(got.exception, ConfigError) and message in str(got.exception), (args, got.exception)
    assert not (tmp_path / "x").exists()
