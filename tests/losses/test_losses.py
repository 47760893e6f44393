import math

import pytest
import torch

from reidcli.errors import ConfigError
from reidcli.losses.combined import LossConfig, center_loss, compute_losses, parse_loss_spec
from reidcli.losses.positional import patch_embedding, relation_vectors, rp_triplet, top_patches
from reidcli.losses.triplet import batch_hard_triplet, hardest_pairs, pairwise_distance
from reidcli.model.vit import ModelConfig, ViTReID


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    # 1-D features: id 0 at {0, 1, 5}, id 1 at {2, 10}
    x = torch.tensor([[0.0], [1.0], [5.0], [2.0], [10.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    d_ap, d_an = hardest_pairs(pairwise_distance(x), y)
    torch.testing.assert_close(d_ap, torch.tensor([5.0, 4.0, 5.0, 8.0, 8.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(d_an, torch.tensor([2.0, 1.0, 3.0, 1.0, 5.0]), atol=1e-3, rtol=0)
    gap = d_ap - d_an
    torch.testing.assert_close(batch_hard_triplet(x, y), torch.nn.functional.softplus(gap).mean(), atol=1e-3, rtol=0)
    torch.testing.assert_close(batch_hard_triplet(x, y, margin=0.3), torch.relu(gap + 0.3).mean(), atol=1e-3, rtol=0)


def test_triplet_without_positives_is_zero_not_nan():
    x = torch.randn(4, 8, requires_grad=True)
    loss = batch_hard_triplet(x, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()


def test_distances_and_patch_ranking_stay_float32_under_bf16_autocast():
    """Autocast would run their products in bf16: distances between features with a large shared component then
    lose the differences that pick the hardest pairs. Under autocast they equal the float32 results exactly."""
    gen = torch.Generator().manual_seed(0)
    x = 10 + 0.01 * torch.randn(8, 64, generator=gen)
    tokens = 10 + 0.01 * torch.randn(8, 12, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist, top = pairwise_distance(x), top_patches(x, tokens, 4)
        sq = x.pow(2).sum(1)
        unguarded = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()  # the product in bf16
    assert dist.dtype == torch.float32 and torch.equal(dist, pairwise_distance(x))
    assert torch.equal(top, top_patches(x, tokens, 4))
    assert unguarded.dtype == torch.float32 and (unguarded - dist).abs().max() > 1.0  # distances are ≈ 0.11


def test_loss_spec_parsing():
    assert parse_loss_spec("rp-triplet") == ("ce", "triplet", "rp-triplet")
    assert parse_loss_spec("triplet+ce") == ("ce", "triplet")
    assert parse_loss_spec("ce+patch-triplet") == ("ce", "patch-triplet")
    with pytest.raises(ConfigError, match="unknown loss 'arcface'"):
        parse_loss_spec("ce+arcface")


def test_top_patches_and_patch_embedding():
    cls = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [1.0, 1.0], [-1.0, 0.0]]])
    assert top_patches(cls, tokens, 2).tolist() == [[1, 2]]
    torch.testing.assert_close(patch_embedding(cls, tokens, 2), torch.tensor([[1.0, 0.55]]))


def test_relation_vector_has_one_value_per_pair_in_rank_order():
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe="both", image_size=(64, 32), dim=16, depth=1, heads=2))
    out = model(torch.randn(3, 3, 64, 32))
    rel = relation_vectors(model, out.feat, out.tokens, 5)
    assert rel.shape == (3, math.comb(5, 2))
    idx = top_patches(out.feat, out.tokens, 5)
    torch.testing.assert_close(rel[1, 0], model.positional_relation(idx[1, 0], idx[1, 1]))
    torch.testing.assert_close(rel[2, -1], model.positional_relation(idx[2, 3], idx[2, 4]))


def test_raw_rp_triplet_rewards_inflated_positions_stable_does_not():
    """The seed's divergence: scaling the relations lowers the raw loss without bound; the stable form is
    scale-invariant."""
    torch.manual_seed(0)
    rel = torch.randn(8, 10)
    y = torch.arange(8) // 2
    raw = [rp_triplet(rel * s, y, "raw").item() for s in (1, 10, 100)]
    stable = [rp_triplet(rel * s, y, "stable").item() for s in (1, 10, 100)]
    if raw[0] < math.log(2):  # d_ap < d_an on average: scaling drives the raw loss towards 0 (and the norms up)
        assert raw[2] < raw[1] < raw[0]
    else:  # or makes it blow up
        assert raw[2] > raw[1] > raw[0]
    assert max(stable) - min(stable) < 1e-5


def test_compute_losses_components_and_rp_warmup():
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe="ape", image_size=(64, 32), dim=16, depth=1, heads=2, num_classes=4))
    out = model(torch.randn(8, 3, 64, 32))
    y = torch.arange(8) // 2
    cfg = LossConfig(spec="rp-triplet", top_n=4, rp_warmup_epochs=4)
    comps = compute_losses(model, out, y, cfg, epoch=0.0)
    assert set(comps) == {"ce", "triplet", "rp-triplet"}
    assert comps["rp-triplet"].item() == 0.0  # warm-up starts at zero weight
    half = compute_losses(model, out, y, cfg, epoch=2.0)["rp-triplet"]
    full = compute_losses(model, out, y, cfg, epoch=4.0)["rp-triplet"]
    torch.testing.assert_close(half * 2, full)
    full.backward()
    assert model.pos.pos_embed.grad.abs().sum() > 0  # the RP loss trains the position embedding
    assert model.blocks[0].attn.qkv.weight.grad is None  # and nothing else


def test_center_loss_is_the_mean_squared_distance_to_the_label_centre():
    feat = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # ‖(1,0)−(0,0)‖² = 1, ‖(0,2)−(1,1)‖² = 2, ‖(3,4)−(1,1)‖² = 13
    assert float(center_loss(feat, labels, centers)) == pytest.approx((1 + 2 + 13) / 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert center_loss(feat.bfloat16(), labels, centers).dtype == torch.float32


def test_center_loss_spec():
    assert parse_loss_spec("center+triplet+ce") == ("ce", "triplet", "center")
    assert parse_loss_spec("ce+center") == ("ce", "center")
    with pytest.raises(ConfigError, match="join it to ce or triplet, e.g. ce\\+triplet\\+center"):
        parse_loss_spec("center")
    with pytest.raises(ConfigError, match="--center-lr 0.0 must be positive"):
        LossConfig(spec="ce+center", center_lr=0.0).validate()
    with pytest.raises(ConfigError, match="the center loss needs its identity centres"):
        model = ViTReID(ModelConfig(pe="ape", image_size=(32, 16), dim=8, depth=1, heads=2, num_classes=2))
        x = torch.randn(4, 3, 32, 16)
        compute_losses(model, model(x), torch.tensor([0, 0, 1, 1]), LossConfig(spec="ce+center"))
