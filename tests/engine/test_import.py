"""``reid import``: TransReID-format and timm-format ViT weights become a run folder whose model equals the source."""

import json

import pytest
import torch
from safetensors.torch import save_file

from reidcli.engine.checkpoint import load_run_model
from reidcli.engine.extract import embed_images
from reidcli.engine.importer import ImportOptions, import_run, infer_model_config, rename_transreid
from reidcli.errors import ConfigError, FormatError
from reidcli.model.vit import ModelConfig, ViTReID
from tests.conftest import TINY_TRAIN, run_cli_here

CPU = torch.device("cpu")


def _model(**kw) -> ViTReID:
    cfg = dict(image_size=(64, 32), patch_size=16, stride=12, dim=64, depth=3, heads=2, pe="ape", num_classes=5)
    torch.manual_seed(0)
    model = ViTReID(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # away from the initial values (zero tables, unit BN), so that every tensor matters
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
            bn.running_var.abs_().add_(0.5)
    return model


def _transreid_layout(model: ViTReID) -> dict[str, torch.Tensor]:
    """Our state dict in TransReID's names: ``base.`` backbone; with JPM, the global branch's last block and norm as
    ``b1.0``/``b1.1`` (the backbone's own then unused: random here), the local branch as ``b2``, the groups'
    BNNecks and classifiers as ``bottleneck_i``/``classifier_i``; wrapped as a DataParallel ``state_dict``."""
    last = f"blocks.{model.cfg.depth - 1}."
    out = {}
    for k, v in model.state_dict().items():
        if model.cfg.jpm and k.startswith((last, "norm.")):
            out[("b1.0." + k[len(last) :]) if k.startswith(last) else "b1.1." + k[5:]] = v
            out["base." + k] = torch.randn_like(v) if v.is_floating_point() else v  # unused by TransReID's JPM
        elif k.startswith(("jpm_block.", "jpm_norm.")):
            out[("b2.0." if k.startswith("jpm_block.") else "b2.1.") + k.split(".", 1)[1]] = v
        elif k.startswith(("jpm_bottlenecks.", "jpm_classifiers.")):
            name, i, rest = k.split(".", 2)
            out[f"{name[4:-1]}_{int(i) + 1}.{rest}"] = v
        elif k.startswith(("bottleneck.", "classifier.")):
            out[k] = v
        else:
            out["base." + ("pos_embed" if k == "pos.pos_embed" else k)] = v
    out["base.fc.weight"] = torch.zeros(1000, model.cfg.dim)  # ImageNet's head, left in by some exports
    return {"state_dict": {"module." + k: v for k, v in out.items()}}


def _same_model(a: ViTReID, b: ViTReID, cameras: int = 0) -> None:
    assert a.cfg.to_dict() | {"drop_path": 0.0} == b.cfg.to_dict() | {"drop_path": 0.0}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    images = torch.randint(0, 256, (6, *a.cfg.image_size, 3), dtype=torch.uint8).numpy()
    camids = torch.arange(6).remainder(max(cameras, 1)).numpy() if cameras else None
    fa = embed_images(a, images, CPU, camids=camids)
    fb = embed_images(b.eval(), images, CPU, camids=camids)
    torch.testing.assert_close(torch.as_tensor(fa), torch.as_tensor(fb), rtol=0, atol=1e-6)


def test_transreid_jpm_sie_checkpoint_becomes_the_same_model(tmp_path, tiny_data):
    source = _model(jpm=True, sie_cameras=6)
    torch.save(_transreid_layout(source), tmp_path / "transformer_120.pth")
    r = run_cli_here("import", str(tmp_path / "transformer_120.pth"), "--out", str(tmp_path / "run"),
                     "--image-size", "64x32", "--heads", "2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["initialised"] == [] and report["left out"] == ["fc.weight"]
    assert "stride 12" in report["model"] and report["jpm"] == "4 groups" and report["sie cameras"] == 6
    model, config, _ = load_run_model(tmp_path / "run", CPU)
    imported = config["imported_from"]
    assert imported["path"].endswith("transformer_120.pth") and len(imported["sha256"]) == 64
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    for resume in ((), ("--resume",)):  # neither trained over nor "resumed" from scratch
        r = run_cli_here("train", "--out", str(tmp_path / "run"), "--data", str(tiny_data), *resume, *TINY_TRAIN)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert ("fine-tune from them with 'reid train --init" if resume else "already holds a run") in r.stderr
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    from reidcli.cli.doctor import _check_run

    run_row, pair = _check_run(tmp_path / "run", tiny_data)
    assert "imported from" in run_row[2] and "transformer_120.pth" in run_row[2]
    assert pair[1] == "note" and "can be extracted and evaluated on this dataset" in pair[2]  # not its classes
    _same_model(source, model, cameras=6)


def test_timm_backbone_and_our_own_weights(tmp_path):
    """A timm ViT (no BNNeck: initialised, the feature before it unaffected) as .safetensors; our own run's weights
    with relative tables: the encoding is read from them."""
    source = _model(num_classes=0, stride=16)
    timm_state = {("pos_embed" if k == "pos.pos_embed" else k): v for k, v in source.state_dict().items()}
    timm_state = {k: v for k, v in timm_state.items() if not k.startswith("bottleneck.")}
    timm_state["head.weight"] = torch.zeros(1000, 64)
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(tmp_path / "vit.safetensors"))
    result = import_run(tmp_path / "vit.safetensors", tmp_path / "timm", ImportOptions(image_size=(64, 32), heads=2))
    assert result.config.stride == 16 and result.config.pe == "ape" and result.config.num_classes == 0
    assert all(k.startswith("bottleneck.") for k in result.initialised) and result.dropped == ["head.weight"]
    model, _, _ = load_run_model(tmp_path / "timm", CPU)
    images = torch.randint(0, 256, (4, 64, 32, 3), dtype=torch.uint8).numpy()
    torch.testing.assert_close(
        torch.as_tensor(embed_images(model, images, CPU)), torch.as_tensor(embed_images(source, images, CPU))
    )
    ours = _model(pe="both")
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    result = import_run(tmp_path / "ours.pth", tmp_path / "both", ImportOptions(image_size=(64, 32), heads=2))
    assert result.config.pe == "both" and result.initialised == []
    _same_model(ours, load_run_model(tmp_path / "both", CPU)[0])


def test_stride_is_read_from_the_ape_length():
    """TransReID's *_stride models: 256x128 with stride 12 is 21 x 10 patches, 211 APE rows with the CLS."""
    state = {
        "cls_token": torch.zeros(1, 1, 768),
        "patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "pos.pos_embed": torch.zeros(1, 211, 768),
        "blocks.11.norm1.weight": torch.zeros(768),
        "blocks.0.mlp.fc1.weight": torch.zeros(3072, 768),
    }
    cfg = infer_model_config(state, ImportOptions())
    assert (cfg.stride, cfg.grid, cfg.depth, cfg.heads, cfg.mlp_ratio) == (12, (21, 10), 12, 12, 4.0)
    assert infer_model_config({**state, "pos.pos_embed": torch.zeros(1, 129, 768)}, ImportOptions()).stride == 16
    with pytest.raises(ConfigError, match="APE has 100 patches, which no stride"):
        infer_model_config({**state, "pos.pos_embed": torch.zeros(1, 101, 768)}, ImportOptions())
    assert rename_transreid({"module.base.pos_embed": torch.zeros(1)}).keys() == {"pos.pos_embed"}


def test_refusals_leave_nothing(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(FormatError, match="holds no ViT"):
        import_run(tmp_path / "resnet.pth", tmp_path / "a")
    partial = _model().state_dict()
    del partial["blocks.1.attn.qkv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(FormatError, match="lacks 1 tensor.*blocks.1.attn.qkv.weight"):
        import_run(tmp_path / "partial.pth", tmp_path / "b", ImportOptions(image_size=(64, 32), heads=2))
    with pytest.raises(ConfigError, match="divisible by --heads 5"):
        import_run(tmp_path / "partial.pth", tmp_path / "c", ImportOptions(image_size=(64, 32), heads=5))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("mine")
    r = run_cli_here("import", str(tmp_path / "partial.pth"), "--out", str(tmp_path / "d"))
    assert r.returncode == 1 and "already exists and is not an empty folder" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "partial.pth", "resnet.pth"]  # no run, no .partial
