"""The pictures of one trained run: curves, APE similarity, RPE bias maps, the RP loss's patches and relations.

``run_pictures`` serves ``reid plot RUN`` (one run) and ``reid ablate`` (one run per variant, plus ranked lists).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from reidcli.engine.checkpoint import RunFiles, load_run_model, read_metrics
from reidcli.errors import ConfigError
from reidcli.report.plots import (
    _canvas_axes,
    _label_panels,
    _plt,
    _save,
    _save_exact,
    _scale,
    _text_rows,
    mosaic,
    plot_ape_similarity,
    plot_rpe_bias,
    plot_training_curves,
)

__all__ = [
    "PICTURES",
    "run_pictures",
    "variant_pictures",
    "plot_relation_vectors",
    "plot_attention",
    "attention_maps",
    "patch_origins",
]

log = logging.getLogger(__name__)

# file stem → what the picture shows (the table `reid plot` prints)
PICTURES = {
    "curves": "loss components, learning rate and logged norms / evaluation mAP per epoch",
    "ape_similarity": "cosine similarity of each patch's absolute position embedding to every patch's",
    "rpe_bias": "relative-position bias over (Δrow, Δcol), per layer (rows) and head (columns)",
    "relation_vectors": "the RP loss's top-N patches on an anchor, a positive and a negative, and their relations",
    "attention": "where the CLS token looks: attention rollout over all blocks, and the last block's CLS attention, "
    "on query images",
}


def run_pictures(
    run: str | Path, out: Path, data: str | Path | None = None, tag: str = "", title: str = ""
) -> tuple[list[Path], list[str]]:
    """Write the pictures of the run folder ``run`` into ``out`` (``<stem>[_<tag>].png``).

    ``data`` is the dataset for the relation-vector picture (default: the one the run was trained on); when it
    is not given and the saved path does not reach from here, that picture is skipped. Returns the paths
    written and a line per picture skipped.
    """
    files = RunFiles(run)
    model, config, _ = load_run_model(files.root, "cpu")
    suffix = f"_{tag}" if tag else ""
    title = title or tag or files.root.name
    written: list[Path] = []
    skipped: list[str] = []
    # the dataset of the pictures drawn on images, checked before anything is drawn
    source = Path(data) if data is not None else Path(str(config.get("data") or ""))
    if data is None and not source.is_file():
        skipped.append(
            f"relation_vectors, attention: the run's dataset {str(source) or '(none recorded)'} is not found from "
            "here; pass --data"
        )
        source = None
    else:
        from reidcli.data.store import read_dataset

        _check_image_size(model, read_dataset(source, ("train",), images=False)[0], source)
    positional = model.pos is not None or model.rel_pos is not None
    if not positional:
        skipped.append("position pictures: the model has no positional encoding (--pe none)")
    metrics = read_metrics(files.metrics)
    if metrics:
        written.append(out / f"curves{suffix}.png")
        plot_training_curves(metrics, written[-1], title=title)
    else:
        skipped.append("curves: metrics.jsonl has no finished epoch yet")
    grid = model.cfg.grid
    if model.pos is not None:
        written.append(out / f"ape_similarity{suffix}.png")
        label = "sin-cos PE" if model.cfg.pe == "sincos" else "APE"
        plot_ape_similarity(model.pos.patch_embeddings().detach().numpy(), grid, written[-1], f"{title}: {label}")
    if model.rel_pos is not None:
        tables = torch.stack([r.relative_position_bias_table.detach() for r in model.rel_pos]).numpy()
        written.append(out / f"rpe_bias{suffix}.png")
        plot_rpe_bias(tables, grid, written[-1], title=f"{title}: RPE bias by offset")
    if source is not None and positional:
        top_n = int(config.get("loss", {}).get("top_n", 8))
        written.append(out / f"relation_vectors{suffix}.png")
        plot_relation_vectors(model, source, written[-1], top_n, title=title)
    if source is not None:
        written.append(out / f"attention{suffix}.png")
        plot_attention(model, source, written[-1], title=title)
    return written, skipped


def _check_image_size(model, attrs: dict, data: str | Path) -> None:
    size = tuple(int(v) for v in attrs["image_size"])
    if size != tuple(model.cfg.image_size):
        raise ConfigError(
            f"the dataset {data} has {size[0]}x{size[1]} images but the model was trained on "
            f"{model.cfg.image_size[0]}x{model.cfg.image_size[1]}; pass --data with a dataset prepared at that size"
        )


def patch_origins(indices: np.ndarray, grid_width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel (y, x) of each patch index (row-major over the patch grid, as the tokens)."""
    rows, cols = np.divmod(np.asarray(indices), grid_width)
    return rows * stride, cols * stride


def variant_pictures(variant, out: Path) -> list[Path]:
    """The pictures of ``variant`` (seed of the first run) in ``out``, with its ranked lists; return the paths."""
    tag = variant.tag
    written, skipped = run_pictures(variant.run_dir, out, variant.train.data, tag=tag, title=variant.label)
    for line in skipped:
        log.info("%s: %s", tag, line)
    written.append(out / f"ranked_{tag}.png")
    _ranked(variant, written[-1])
    return written


def _triple(pids: np.ndarray) -> tuple[int, int, int]:
    """Indices of an anchor, a positive (same id) and a negative (another id); the anchor stands in for a missing
    positive or negative (a split with no repeated id, or one id)."""
    ids, counts = np.unique(pids, return_counts=True)
    pid = ids[np.argmax(counts >= 2)]
    same = np.flatnonzero(pids == pid)
    other = np.flatnonzero(pids != pid)
    return int(same[0]), int(same[min(1, len(same) - 1)]), int(other[0] if len(other) else same[0])


@torch.no_grad()
def plot_relation_vectors(model, data: str | Path, path: Path, top_n: int, title: str = "") -> None:
    """An anchor, a positive and a negative training image with the top-N patches the RP loss picks (boxes numbered
    in rank order: most CLS-similar first), and the C(N,2) positional relations of those patches' pairs."""
    from reidcli.data.augment import normalize_batch
    from reidcli.data.store import read_dataset, read_images
    from reidcli.losses.positional import relation_vectors, top_patches

    attrs, parts = read_dataset(data, ("train",), images=False)
    _check_image_size(model, attrs, data)
    pids = parts["train"].pids
    rows = np.array(_triple(pids))
    images = read_images(data, "train", rows)
    model.eval()
    cams = torch.from_numpy(parts["train"].camids[rows]) if model.uses_cameras else None
    out = model(normalize_batch(torch.from_numpy(images)), cams)
    top = top_patches(out.feat, out.tokens, top_n).numpy()
    rel = relation_vectors(model, out.feat, out.tokens, top_n).numpy()
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 5]})
    colours = plt.get_cmap("plasma")(np.linspace(0.0, 0.85, top.shape[1]))
    patch = model.cfg.patch_size
    for ax, image, picked, row, name in zip(
        axes[:3], images, top, rows, ("anchor", "positive", "negative"), strict=True
    ):
        ax.imshow(image)
        ys, xs = patch_origins(picked, model.cfg.grid[1], model.cfg.stride)
        for rank in range(len(picked) - 1, -1, -1):  # the first-ranked box drawn last, on top
            y, x = int(ys[rank]), int(xs[rank])
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), patch, patch, fill=False, lw=1.2, ec=colours[rank]))
            ax.text(
                x + 1,
                y + 1,
                str(rank + 1),
                color="white",
                fontsize=6,
                va="top",
                bbox={"boxstyle": "square,pad=0.1", "fc": colours[rank], "ec": "none"},
            )
        ax.set_title(f"{name} (pid {pids[row]})", fontsize=8)
        ax.axis("off")
    for r, name in zip(rel, ("anchor", "positive", "negative"), strict=True):
        axes[3].plot(r, marker=".", label=name)
    axes[3].set(title=f"positional relation r(a, b) of the top-{top_n} patch pairs", xlabel="pair (rank order)")
    axes[3].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


@torch.no_grad()
def attention_maps(
    model, x: torch.Tensor, camids: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, N) attention rollout of the CLS token over the N patches, and each block's attention weights
    (B, heads, N+1, N+1), for normalised images ``x`` (the global branch; JPM's copy of the last block aside).

    The forward runs as always (SDPA); each block's attention input and bias are taken on the way and its weights
    ``softmax(QKᵀ/√d + B)`` computed by the layer (:meth:`Attention.weights`). Rollout (Abnar & Zuidema, 2020): per
    block the heads' mean with the residual as ½(A + I), rows renormalised, multiplied from the first block to the
    last."""
    taken: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    take = lambda _m, args: taken.append(args[:2])  # noqa: E731 — (input, bias), not the cls_only flag
    hooks = [b.attn.register_forward_pre_hook(take) for b in model.blocks]
    try:
        model.eval()
        model.forward_features(x, camids)
    finally:
        for h in hooks:
            h.remove()
    weights = [block.attn.weights(inp, bias) for block, (inp, bias) in zip(model.blocks, taken, strict=True)]
    eye = torch.eye(weights[0].shape[-1], device=x.device)
    rollout = eye.expand(len(x), -1, -1)
    for w in weights:
        a = 0.5 * w.mean(1) + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout[:, 0, 1:], weights


@torch.no_grad()
def plot_attention(model, data: str | Path, path: Path, title: str = "", count: int = 6) -> None:
    """``count`` query images of different identities, each with its attention rollout and the last block's CLS
    attention (mean over heads) laid over it, upsampled from the patch grid to the pixels (each patch's value spread
    over its stride cell)."""
    from reidcli.data.augment import normalize_batch
    from reidcli.data.store import read_dataset, read_images

    attrs, parts = read_dataset(data, ("query",), images=False)
    _check_image_size(model, attrs, data)
    pids = parts["query"].pids
    rows = np.sort(np.unique(pids, return_index=True)[1])[:count]
    images = read_images(data, "query", rows)
    cams = torch.from_numpy(parts["query"].camids[rows]) if model.uses_cameras else None
    rollout, weights = attention_maps(model, normalize_batch(torch.from_numpy(images)), cams)
    last = weights[-1].mean(1)[:, 0, 1:]
    gh, gw = model.cfg.grid
    h, w = model.cfg.image_size
    jet = _plt().get_cmap("jet")
    cells = np.empty((2, len(rows), h, w, 3), np.uint8)
    for i, maps in enumerate((rollout, last)):
        m = maps.view(-1, 1, gh, gw)
        m = torch.nn.functional.interpolate(m, size=(gh * model.cfg.stride, gw * model.cfg.stride))[:, 0]
        full = torch.zeros(len(rows), h, w)
        full[:, : m.shape[1], : m.shape[2]] = m[:, :h, :w]
        full = full / full.amax((1, 2), keepdim=True).clamp_min(1e-12)
        heat = 255 * jet(full.numpy())[..., :3]
        cells[i] = (0.55 * images + 0.45 * heat).round().clip(0, 255).astype(np.uint8)  # the map at alpha 0.45
    scale = _scale(w, 96)
    canvas, ys, xs = mosaic(cells, gap=max(2, w // 16), fill=255, top=_text_rows(1, scale))
    fig, ax = _canvas_axes(
        canvas.shape, scale, f"{title}: CLS attention (top: rollout over all blocks; bottom: last block)"
    )
    ax.imshow(canvas, interpolation="nearest")
    names = [[f"pid {pids[row]}" + (f": {name}" if j == 0 else "") for j, row in enumerate(rows)] for name in
             ("rollout", "last block")]  # fmt: skip
    _label_panels(ax, names, ys, xs, w)
    _save_exact(fig, path)


def _ranked(variant, path: Path) -> None:
    """Ranked lists of a few queries, from the features the ablation saved in the run folder."""
    from reidcli.report.ranked import write_ranked_lists
    from reidcli.retrieval.features import read_features

    features = variant.run_dir / "features.h5"
    if features.is_file():
        _, feats = read_features(features)
    else:  # a run finished before features were kept: embed on the best device there is
        from reidcli.engine.extract import embed_dataset
        from reidcli.retrieval.evaluate import resolve_device

        device = resolve_device(variant.train.device)
        model, _, _ = load_run_model(variant.run_dir, device)
        feats = embed_dataset(model, variant.train.data, ("query", "gallery"), device)
    write_ranked_lists(path, feats["query"], feats["gallery"], Path(variant.train.data), 6, 8)
