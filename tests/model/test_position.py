import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reidcli.model.position import build_relative_position_index, num_relative_positions, sincos_2d
from reidcli.model.vit import ModelConfig, ViTReID, parameter_report


def test_seed_2x2_example():
    index = build_relative_position_index((2, 2), cls_token=False)
    assert index.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7))
def test_index_is_the_swin_formula_on_any_grid(h, w):
    index = build_relative_position_index((h, w))
    t = num_relative_positions((h, w))
    for i in range(h * w):
        for j in range(h * w):
            hi, wi, hj, wj = i // w, i % w, j // w, j % w
            assert index[1 + i, 1 + j] == (hi - hj + h - 1) * (2 * w - 1) + (wi - wj + w - 1)
    assert (index[0, 1:] == t).all() and (index[1:, 0] == t + 1).all() and index[0, 0] == t + 2
    # the same offset gives the same index; every offset is used
    assert set(index[1:, 1:].flatten().tolist()) == set(range(t))


def test_sincos_is_the_seed_formula():
    pe = sincos_2d((3, 4), 8)
    assert pe.shape == (12, 8)
    row, col = 2, 3
    token = row * 4 + col
    omega = 1 / 10000 ** (torch.arange(2) / 2)
    expect = torch.tensor(
        [
            torch.sin(row * omega[0]),
            torch.cos(row * omega[0]),
            torch.sin(row * omega[1]),
            torch.cos(row * omega[1]),
            torch.sin(col * omega[0]),
            torch.cos(col * omega[0]),
            torch.sin(col * omega[1]),
            torch.cos(col * omega[1]),
        ]
    )
    torch.testing.assert_close(pe[token], expect.float())


def test_seed_parameter_counts():
    # APE of a 16×12 grid with CLS at width 768 = (192+1)·768 = 148,224
    ape = ViTReID(ModelConfig(pe="ape", image_size=(256, 192), dim=768, depth=1, heads=12))
    assert parameter_report(ape)["ape"] == 148_224
    # RPE of a 14×14 grid, 12 heads, 12 layers = 12·27·27·12 = 104,976 (+ 3 CLS rows per layer and head)
    rpe = ViTReID(ModelConfig(pe="rpe", image_size=(224, 224), dim=48, depth=12, heads=12))
    report = parameter_report(rpe)
    assert report["rpe"] == 104_976 + 12 * 12 * 3
    assert report["ape"] == 0 and 0 < report["pe_share"] < 1
    both = parameter_report(ViTReID(ModelConfig(pe="both", image_size=(64, 32), dim=64, depth=2, heads=4)))
    assert both["ape"] == (8 + 1) * 64 and both["rpe"] == 2 * 4 * ((7 * 3) + 3)


def test_the_last_blocks_patch_offsets_learn_only_from_a_loss_on_the_patch_tokens():
    """Why the last row of rpe_bias.png stays 0 under ce+triplet: a loss on the CLS feature reaches the last block's
    table only through its CLS entries (the CLS query's row), while the earlier blocks' patch offsets all get
    gradient; a loss on the patch tokens (as the RP and patch triplets use) reaches the last block's offsets too."""
    torch.manual_seed(0)
    cfg = ModelConfig(pe="rpe", image_size=(32, 16), patch_size=8, stride=8, dim=16, depth=2, heads=2, drop_path=0.0)
    model = ViTReID(cfg)
    with torch.no_grad():
        for r in model.rel_pos:
            r.relative_position_bias_table.normal_()
    offsets = num_relative_positions(cfg.grid)  # the table's rows before the 3 CLS rows
    out = model(torch.randn(3, 3, 32, 16))
    first, last = (r.relative_position_bias_table for r in model.rel_pos)
    first_grad, last_grad = torch.autograd.grad(out.feat.square().sum(), (first, last), retain_graph=True)
    assert (last_grad[:offsets] == 0).all() and (last_grad[offsets:] != 0).any()
    assert (first_grad[:offsets] != 0).any()
    (from_tokens,) = torch.autograd.grad(out.tokens.square().sum(), last)
    assert (from_tokens[:offsets] != 0).any()
