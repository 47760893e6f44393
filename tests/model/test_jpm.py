"""TransReID's jigsaw patch module (``--jpm``): local features from shifted, shuffled patch groups."""

import json

import h5py
import pytest
import torch
import torch.nn.functional as F

from reidcli.errors import ConfigError
from reidcli.losses.combined import LossConfig, compute_losses
from reidcli.losses.triplet import batch_hard_triplet
from reidcli.model.vit import ModelConfig, ViTReID, jpm_groups_index, parameter_report
from tests.conftest import TINY_MODEL, run_cli, run_cli_here

SMALL = {"image_size": (32, 16), "patch_size": 8, "stride": 8, "dim": 16, "depth": 2, "heads": 2, "drop_path": 0.0}


def _model(pe: str = "both", **kw) -> ViTReID:
    torch.manual_seed(0)
    return ViTReID(ModelConfig(pe=pe, num_classes=5, jpm=True, **{**SMALL, **kw})).eval()


def test_groups_are_the_rolled_then_interleaved_patches():
    # 8 patches rolled by 1: 1..7,0; interleaved by 2: 1,5,2,6,3,7,4,0; four groups of two
    cfg = ModelConfig(pe="ape", jpm=True, jpm_shift=1, jpm_shuffle=2, jpm_groups=4, **SMALL)
    assert jpm_groups_index(cfg).tolist() == [[1, 5], [2, 6], [3, 7], [4, 0]]
    # 7 patches (7×1 grid) do not split in two: padded with the second-to-last one, as TransReID pads; groups of
    # ⌊7 / 2⌋ = 3 (TransReID's patch_length counts the patches before the padding)
    odd = ModelConfig(pe="ape", jpm=True, jpm_shift=0, jpm_shuffle=2, jpm_groups=2, **{**SMALL, "image_size": (56, 8)})
    assert jpm_groups_index(odd).tolist() == [[0, 4, 1], [5, 2, 6]]
    with pytest.raises(ConfigError, match="--jpm-groups 9 must be between 1 and the 8 patches"):
        ModelConfig(pe="ape", jpm=True, jpm_groups=9, **SMALL).validate()


def test_local_features_equal_the_last_block_copy_on_each_group():
    """Each group: the CLS token and its patches as they enter the last block, through the JPM block with the
    relative bias of exactly those token pairs, then its norm; the global branch is the model without JPM."""
    model = _model(pe="both", jpm_shift=3)
    with torch.no_grad():  # make the branch differ from the last block, and the bias non-zero
        for p in model.jpm_block.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for table in [model.jpm_rel_pos.relative_position_bias_table] + [
            r.relative_position_bias_table for r in model.rel_pos
        ]:
            table.normal_()
    x = torch.randn(3, 3, 32, 16)
    tokens, entering = model._encode(x, None)
    full = model.jpm_rel_pos()
    by_hand = []
    for group in jpm_groups_index(model.cfg):
        sel = torch.cat([torch.zeros(1, dtype=torch.long), group + 1])
        part = entering[:, sel]
        bias = full[:, sel][:, :, sel]
        by_hand.append(model.jpm_norm(model.jpm_block(part, bias))[:, 0])
    out = model(x)
    torch.testing.assert_close(out.local_feat, torch.stack(by_hand, dim=1))
    plain = ViTReID(ModelConfig(pe="both", num_classes=5, **SMALL)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(out.feat, plain(x).feat)  # the global path is untouched
    assert out.local_logits.shape == (3, 4, 5)
    g = model.cfg.jpm_groups
    torch.testing.assert_close(model._test_feature(x), torch.cat([out.feat, out.local_feat.flatten(1) / g], dim=1))
    assert model.embed(x, flip=True).shape == (3, 16 * (1 + g)) == (3, model.cfg.feature_dim)
    report = parameter_report(model)
    assert report["jpm"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("jpm_"))


def test_the_branch_starts_as_a_copy_of_the_last_block():
    model = _model(pe="rpe")
    for a, b in zip(model.jpm_block.parameters(), model.blocks[-1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        model.jpm_rel_pos.relative_position_bias_table, model.rel_pos[-1].relative_position_bias_table
    )
    with torch.no_grad():  # weights loaded afterwards (--init): synced again
        model.blocks[-1].attn.qkv.weight.add_(1.0)
    model.sync_jpm()
    torch.testing.assert_close(model.jpm_block.attn.qkv.weight, model.blocks[-1].attn.qkv.weight)


def test_losses_are_half_global_half_the_groups_mean():
    model = _model(pe="ape").train()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = model(torch.randn(6, 3, 32, 16))
    comps = compute_losses(model, out, labels, LossConfig(spec="ce+triplet"))
    g = model.cfg.jpm_groups
    ce = (
        0.5 * F.cross_entropy(out.logits, labels)
        + 0.5 * sum(F.cross_entropy(out.local_logits[:, i], labels) for i in range(g)) / g
    )
    tri = (
        0.5 * batch_hard_triplet(out.feat, labels, None)
        + 0.5 * sum(batch_hard_triplet(out.local_feat[:, i], labels, None) for i in range(g)) / g
    )
    torch.testing.assert_close(comps["ce"], ce)
    torch.testing.assert_close(comps["triplet"], tri)
    sum(comps.values()).backward()
    assert model.jpm_block.attn.qkv.weight.grad.abs().sum() > 0 and model.jpm_classifiers[0].weight.grad is not None


def test_train_extract_resume_with_jpm(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(tiny_data), "--out", str(run), "--pe", "both", *TINY_MODEL, "--batch", "16",
                "--epochs", "1", "--jpm", "--jpm-groups", "2", "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["jpm"] and model["jpm_groups"] == 2
    r = run_cli("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["query/feats"].shape[1] == 32 * 3  # global + 2 groups
    r = run_cli_here("evaluate", str(tmp_path / "f.h5"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["num_valid_queries"] > 0, r.stderr
    r = run_cli("train", "--out", str(run), "--resume", "--epochs", "2")
    assert r.returncode == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 2, r.stderr
    r = run_cli_here("train", "--out", str(run), "--resume", "--epochs", "3", "--jpm-groups", "4")
    assert r.returncode == 1 and "was trained with --jpm-groups 2 (given 4)" in r.stderr
    r = run_cli_here("train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--jpm-shift", "2")
    assert r.returncode == 1 and "--jpm-shift has no effect without --jpm" in r.stderr
