"""`reid plot RUN`: the pictures of one trained run, through the real CLI."""

import json
import shutil

import numpy as np
import pytest
import torch

from reidcli.data.prepare import PrepareConfig, prepare_dataset
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic
from reidcli.engine.checkpoint import load_run_model
from reidcli.losses.positional import top_patches
from reidcli.report.figures import patch_origins
from tests.conftest import run_cli, run_cli_here, train_tiny_run

TINY = ("--epochs", "1", "--device", "cpu", "--top-n", "4")


@pytest.fixture(scope="module")
def both_run(tiny_data, tmp_path_factory):
    return train_tiny_run(tiny_data, tmp_path_factory.mktemp("plot") / "both", "both", *TINY)


def test_plot_draws_every_picture_of_a_both_run(both_run):
    r = run_cli("plot", str(both_run), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    names = [p.split("/")[-1] for p in report["pictures"]]
    assert names == ["curves.png", "ape_similarity.png", "rpe_bias.png", "relation_vectors.png", "attention.png"]
    assert report["out"] == str(both_run / "pictures") and report["skipped"] == []
    for name in names:
        assert (both_run / "pictures" / name).stat().st_size > 5000
    table = run_cli("plot", str(both_run), "--out", str(both_run / "again"))
    assert table.returncode == 0 and "relation_vectors.png" in table.stdout and "RP loss" in table.stdout
    assert "attention rollout" in table.stdout


def test_plot_without_the_runs_dataset_skips_the_image_pictures_and_takes_data(both_run, tiny_data, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(both_run, moved, ignore=shutil.ignore_patterns("pictures", "again"))
    config = json.loads((moved / "config.json").read_text())
    config["data"] = str(tmp_path / "gone.h5")
    (moved / "config.json").write_text(json.dumps(config))
    r = run_cli_here("plot", str(moved), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and len(report["pictures"]) == 3
    assert report["skipped"] == [
        f"relation_vectors, attention: the run's dataset {tmp_path / 'gone.h5'} is not found from here; pass --data"
    ]
    r = run_cli_here("plot", str(moved), "--data", str(tiny_data), "--json")
    assert r.returncode == 0 and [p.split("/")[-1] for p in json.loads(r.stdout)["pictures"][-2:]] == [
        "relation_vectors.png",
        "attention.png",
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-a-run", "is not a run folder (no config.json)"),
        ("missing-data", "does not exist; pass the dataset HDF5"),
        ("other-size", "has 32x16 images but the model was trained on 64x32"),
        ("out-under-a-file", "is a file, not a folder"),
    ],
)
def test_plot_bad_input_is_one_line_and_draws_nothing(both_run, tmp_path, case, message):
    args = [str(both_run), "--out", str(tmp_path / "pics")]
    if case == "not-a-run":
        args[0] = str(tmp_path)
    elif case == "missing-data":
        args += ["--data", str(tmp_path / "none.h5")]
    elif case == "other-size":
        generate_synthetic(tmp_path / "raw", SyntheticConfig(num_train_ids=3, num_test_ids=3, images_per_camera=1))
        prepare_dataset(PrepareConfig("synthetic", tmp_path / "raw", tmp_path / "small.h5", image_size=(32, 16)))
        args += ["--data", str(tmp_path / "small.h5")]
    else:
        (tmp_path / "file").write_text("x")
        args[2] = str(tmp_path / "file" / "pics")
    r = run_cli_here("plot", *args)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "pics").exists()


def test_patch_boxes_sit_on_the_patches_the_rp_loss_picks(both_run, tiny_data):
    """The boxes of relation_vectors.png: patch index → pixel origin, for plain and overlapping grids."""
    ys, xs = patch_origins(np.array([0, 1, 7, 8, 17]), grid_width=8, stride=12)
    assert ys.tolist() == [0, 0, 0, 12, 24] and xs.tolist() == [0, 12, 84, 0, 12]
    model, _, _ = load_run_model(both_run)
    h, w = model.cfg.grid
    tokens = torch.zeros(1, h * w, model.cfg.dim)
    tokens[0, w + 1] = 1.0  # the patch at grid (1, 1) is the only one aligned with the CLS feature
    feat = torch.zeros(1, model.cfg.dim)
    feat[0] = 1.0
    picked = top_patches(feat, tokens + 1e-3 * torch.randn_like(tokens), 1)
    y, x = patch_origins(picked.numpy(), w, model.cfg.stride)
    assert (y.item(), x.item()) == (model.cfg.stride, model.cfg.stride)


def test_attention_weights_give_each_blocks_output_and_rollout_follows_its_definition():
    """The weights attention_maps computes reproduce every block's SDPA output (bias and camera embedding included);
    with one block the rollout's CLS row over the patches is ½ · the heads' mean CLS attention."""
    from reidcli.model.vit import ModelConfig, ViTReID
    from reidcli.report.figures import attention_maps

    torch.manual_seed(0)
    small = {"image_size": (32, 16), "patch_size": 8, "stride": 8, "dim": 16, "heads": 2, "drop_path": 0.0}
    model = ViTReID(ModelConfig(pe="both", depth=3, sie_cameras=2, **small)).eval()
    with torch.no_grad():
        for r in model.rel_pos:
            r.relative_position_bias_table.normal_()
    x, cams = torch.randn(3, 3, 32, 16), torch.tensor([0, 1, 1])
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in model.blocks]
    rollout, weights = attention_maps(model, x, cams)
    for h in hooks:
        h.remove()
    seen = seen[: len(model.blocks)]
    assert len(weights) == 3 and rollout.shape == (3, 8)
    for block, w, (inp, out) in zip(model.blocks, weights, seen, strict=True):
        b, n, d = inp.shape
        v = block.attn.qkv(inp).view(b, n, 3, 2, d // 2)[:, :, 2].transpose(1, 2)  # (B, heads, N, hd)
        mixed = block.attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))
        torch.testing.assert_close(mixed, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.sum(-1), torch.ones(b, 2, n))
    one = ViTReID(ModelConfig(pe="rpe", depth=1, **small)).eval()
    rollout, (w,) = attention_maps(one, x)
    torch.testing.assert_close(rollout, 0.5 * w.mean(1)[:, 0, 1:])


def test_mosaic_places_each_cell_and_fills_the_gaps():
    from reidcli.report.plots import mosaic

    cells = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    canvas, ys, xs = mosaic(cells, gap=2, top=3, split=4)
    assert ys.tolist() == [3, 12] and xs.tolist() == [0, 11, 18] and canvas.shape == (16, 23)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            assert np.array_equal(canvas[y : y + 4, x : x + 5], cells[i, j])
    assert np.isnan(canvas).sum() == canvas.size - cells.size  # everything else is the fill


def test_ranked_picture_borders_each_image_in_its_status_colour(tmp_path):
    """The pixels of a ranked list: the query as it is, each gallery image inside a border of its status's colour
    (junk faded), and the saved PNG shows those borders at their full width."""
    from PIL import Image

    from reidcli.report.plots import RANK_COLOURS, plot_ranked_lists, ranked_canvas

    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (2, 40, 20, 3), dtype=np.uint8)
    g = rng.integers(0, 256, (2, 3, 40, 20, 3), dtype=np.uint8)
    status = np.array([[1, 0, -1], [2, 1, 0]])
    canvas, ys, xs, scale = ranked_canvas(q, g, status)
    b = 2  # the thinnest border
    assert scale == 3 and xs[1] - xs[0] > xs[2] - xs[1]  # small images drawn 3×; a wider gap after the query
    for r, y in enumerate(ys):
        assert np.array_equal(canvas[y + b : y + b + 40, xs[0] + b : xs[0] + b + 20], q[r])
        assert (canvas[y : y + b, xs[0] : xs[0] + 24] == 255).all()  # the query has no coloured border
        for c, x in enumerate(xs[1:]):
            cell = canvas[y : y + 44, x : x + 24]
            for edge in (cell[:b], cell[-b:], cell[:, :b], cell[:, -b:]):
                assert (edge == RANK_COLOURS[status[r, c]]).all()
            faded = (g[r, c] * np.float32(0.4) + 150).clip(0, 255).astype(np.uint8)
            assert np.array_equal(cell[b:-b, b:-b], faded if status[r, c] == -1 else g[r, c])
    path = tmp_path / "ranked.png"
    plot_ranked_lists(q, g, status, path, title="t")
    png = np.asarray(Image.open(path).convert("RGB"))
    for value, count in ((1, 2), (0, 2), (-1, 1), (2, 1)):  # border pixels, drawn scale × scale each
        drawn = (png == RANK_COLOURS[value]).all(-1).sum()
        assert drawn >= 0.9 * count * (44 * 24 - 40 * 20) * scale**2, (value, drawn)
