import math

import pytest
import timm
import torch

from reidcli.errors import ConfigError, FormatError
from reidcli.model.attention import Attention
from reidcli.model.vit import PE_CHOICES, ModelConfig, ViTReID
from reidcli.model.weights import load_init_weights, load_state_file

SMALL = dict(image_size=(64, 32), dim=32, depth=2, heads=4, drop_path=0.0)


def test_attention_with_bias_equals_explicit_reference_float64():
    torch.manual_seed(0)
    attn = Attention(16, 4).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    table = torch.randn(4, 9, 9, dtype=torch.float64, requires_grad=True)
    out = attn(x, table)
    # reference: softmax(QKᵀ/√d + B) V, written out
    q, k, v = attn.qkv(x).view(3, 9, 3, 4, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(4) + table
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 9, 16))
    torch.testing.assert_close(out, ref)
    g_out = torch.autograd.grad(out.sum(), table)[0]
    g_ref = torch.autograd.grad(ref.sum(), table)[0]
    torch.testing.assert_close(g_out, g_ref)


@pytest.mark.parametrize(("pe", "jpm"), [("ape", False), ("rpe", False), ("both", False), ("both", True)])
def test_a_cls_only_last_block_gives_the_same_features_logits_and_gradients(pe, jpm):
    """The patch tokens' outputs of the last block feed nothing but themselves: a forward that runs that block for
    the CLS token alone (training with CLS-only losses; every test feature) gives the full forward's feature, logits
    and every parameter's gradient (float64: to rounding), and its test features the full model's CLS token."""
    torch.manual_seed(0)
    cfg = ModelConfig(pe=pe, num_classes=5, jpm=jpm, jpm_groups=2, sie_cameras=3, **{**SMALL, "depth": 3})
    model = ViTReID(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():  # position tables and BNNeck away from their zero/one start
            if "rel_pos" in name or "bottleneck" in name:
                p.normal_(std=0.5)
    x, cams = torch.randn(4, 3, 64, 32, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    full, cls = model(x, cams), model(x, cams, patches=False)
    assert full.tokens.shape == (4, 8, 32) and cls.tokens is None
    for a, b in [(full.feat, cls.feat), (full.logits, cls.logits), (full.local_feat, cls.local_feat)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12) if a is not None else None
    loss = lambda out: out.logits.logsumexp(1).sum() + out.feat.square().sum()  # noqa: E731
    g_full = torch.autograd.grad(loss(full), params, allow_unused=True)
    g_cls = torch.autograd.grad(loss(cls), params, allow_unused=True)
    for name, a, b in zip([n for n, p in model.named_parameters() if p.requires_grad], g_full, g_cls, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x, cams)  # every token, through the whole last block
        feat = model._test_feature(x, cams)
    torch.testing.assert_close(feat[:, :32], tokens[:, 0], rtol=1e-12, atol=1e-12)
    if jpm:  # JPM's copy of the last block likewise runs for each group's CLS token alone
        entering = model._encode(x, cams)[1]
        groups = entering[:, model.jpm_tokens].flatten(0, 1)
        full_bias = model.jpm_rel_pos()
        sel = model.jpm_tokens
        bias = full_bias[:, sel[:, :, None], sel[:, None, :]].permute(1, 0, 2, 3).repeat(4, 1, 1, 1)
        whole = model.jpm_norm(model.jpm_block(groups, bias))[:, 0].view(4, 2, 32)
        torch.testing.assert_close(model._jpm_local(entering), whole, rtol=1e-12, atol=1e-12)


def test_rpe_lookup_sends_each_bias_gradient_to_its_table_row():
    torch.manual_seed(0)
    rel = ViTReID(ModelConfig(pe="rpe", **SMALL)).rel_pos[0]
    bias = rel()
    assert bias.shape == (4, 9, 9) and bias.is_contiguous()
    upstream = torch.randn_like(bias)
    (bias * upstream).sum().backward()
    index = rel.relative_position_index
    expect = torch.zeros_like(rel.relative_position_bias_table)
    for i in range(9):
        for j in range(9):
            expect[index[i, j]] += upstream[:, i, j]
    torch.testing.assert_close(rel.relative_position_bias_table.grad, expect)


def test_matches_timm_vit_with_its_weights():
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(64, 32), num_classes=0, global_pool="token"
    ).eval()
    model = ViTReID(ModelConfig(pe="ape", image_size=(64, 32), dim=192, depth=12, heads=3, drop_path=0.0)).eval()
    result = load_init_weights(model, ref.state_dict())
    assert all(k.startswith("bottleneck.") for k in result["missing"])
    x = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(model.forward_features(x), ref.forward_features(x))


def test_timm_weights_resample_to_another_grid(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)  # 14×14 grid
    path = tmp_path / "w.pth"
    torch.save({"model": ref.state_dict()}, path)
    model = ViTReID(ModelConfig(pe="both", image_size=(256, 128), dim=192, depth=12, heads=3, stride=12))
    load_init_weights(model, load_state_file(path))
    assert model.pos.pos_embed.shape == (1, 21 * 10 + 1, 192)
    torch.testing.assert_close(model.cls_token, ref.cls_token)


@pytest.mark.parametrize("pe", ["ape", "both", "rpe"])
def test_checkpoints_reload_into_new_image_sizes(pe, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    small = ViTReID(ModelConfig(pe=pe, **SMALL))
    if small.rel_pos is not None:
        for r in small.rel_pos:
            torch.nn.init.normal_(r.relative_position_bias_table)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    big = ViTReID(ModelConfig(pe=pe, **{**SMALL, "image_size": (96, 48)}))
    load_init_weights(big, load_state_file(path), old_grid=small.cfg.grid)
    if big.pos is not None:
        assert big.pos.pos_embed.shape == (1, 6 * 3 + 1, 32)
        torch.testing.assert_close(big.pos.pos_embed[0, 0], small.pos.pos_embed[0, 0])  # CLS slot kept
    if big.rel_pos is not None:
        t = big.rel_pos[0].relative_position_bias_table
        assert t.shape == ((2 * 6 - 1) * (2 * 3 - 1) + 3, 4)
        torch.testing.assert_close(t[-3:], small.rel_pos[0].relative_position_bias_table[-3:])  # CLS rows kept
    torch.testing.assert_close(big.blocks[1].attn.qkv.weight, small.blocks[1].attn.qkv.weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        load_state_file(tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="cannot read weights"):
        load_state_file(tmp_path / "bad.pth")
    model = ViTReID(ModelConfig(pe="ape", **SMALL))
    other = ViTReID(ModelConfig(pe="ape", **{**SMALL, "dim": 48, "heads": 4}))
    with pytest.raises(FormatError, match="another shape"):
        load_init_weights(model, other.state_dict())


@pytest.mark.parametrize("pe", PE_CHOICES)
def test_every_pe_trains_a_few_steps(pe):
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe=pe, num_classes=5, **SMALL))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(10, 3, 64, 32), torch.arange(10) % 5
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_positional_relation_batched():
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe="both", **SMALL))
    for r in model.rel_pos:
        torch.nn.init.normal_(r.relative_position_bias_table)
    a, b = torch.tensor([[0, 3], [5, 7]]), torch.tensor([[1, 4], [2, 0]])
    rel = model.positional_relation(a, b)
    p = model.pos.patch_embeddings()
    mean_table = torch.stack([r.relative_position_bias_table for r in model.rel_pos]).mean((0, 2))
    index = model.rel_pos[0].relative_position_index
    expect = (p[5] * p[2]).sum() + mean_table[index[6, 3]]
    torch.testing.assert_close(rel[1, 0], expect)
    ape_only = ViTReID(ModelConfig(pe="ape", **SMALL))
    torch.testing.assert_close(
        ape_only.positional_relation(a, b)[0, 0],
        (ape_only.pos.patch_embeddings()[0] * ape_only.pos.patch_embeddings()[1]).sum(),
    )


def test_flip_averaged_features_are_normalised_and_flip_invariant():
    model = ViTReID(ModelConfig(pe="ape", **SMALL)).eval()
    x = torch.randn(4, 3, 64, 32)
    f = model.embed(x, flip=True)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(f, model.embed(x.flip(3), flip=True))


def test_bad_model_options():
    with pytest.raises(ConfigError, match="unknown --pe"):
        ModelConfig(pe="rope").validate()
    with pytest.raises(ConfigError, match="stride"):
        ModelConfig(stride=20).validate()
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(dim=100, heads=12).validate()
