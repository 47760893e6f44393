"""Pictures (matplotlib, PNG, written atomically): training curves, ranked lists, position maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidcli.fileio import atomic_path

__all__ = [
    "mosaic",
    "ranked_canvas",
    "RANK_COLOURS",
    "plot_training_curves",
    "plot_ranked_lists",
    "plot_ape_similarity",
    "plot_rpe_bias",
    "plot_ablation_summary",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 110  # of the saved pictures


def _save(fig, path: str | Path, tight: bool = True) -> None:
    plt = _plt()
    if tight:
        fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(metrics: list[dict], path: str | Path, title: str = "") -> None:
    """Loss components, learning rate and (when present) evaluation mAP against the epoch."""
    plt = _plt()
    epochs = [m["epoch"] for m in metrics]
    keys = sorted(k for k in metrics[0] if k.startswith("loss_")) if metrics else []
    extra = [k for k in ("eval_mAP", "ape_norm", "rpe_norm") if metrics and k in metrics[-1]]
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(4.2 * (2 + len(extra)), 3.2))
    for k in keys:
        axes[0].plot(epochs, [m.get(k, np.nan) for m in metrics], label=k[5:])
    axes[0].set(title="loss components", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [m["lr"] for m in metrics])
    axes[1].set(title="learning rate", xlabel="epoch")
    for ax, k in zip(axes[2:], extra, strict=False):
        ax.plot(epochs, [m.get(k, np.nan) for m in metrics], marker="o" if k == "eval_mAP" else None)
        ax.set(title=k, xlabel="epoch")
    fig.suptitle(title)
    _save(fig, path)


def mosaic(
    cells: np.ndarray, gap: int = 1, fill: float = np.nan, top: int = 0, split: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay ``cells`` (R, C, h, w) or (R, C, h, w, 3) out as one image: columns ``w + gap`` pixels apart (``split``
    more after the first), rows ``top + h + gap`` apart with ``top`` blank pixels above each (room for labels), the
    space between filled with ``fill``. Returns the image and the top-left pixel of each row (R,) and column (C,).

    One image drawn once is what makes the pictures of many small panels fast: a matplotlib axes per panel cost
    seconds (a 10 × 11 ranked list took 4 s, the 144 maps of ViT-B's RPE 3 s; now a few hundred ms)."""
    rows, cols, h, w = cells.shape[:4]
    ys = top + np.arange(rows) * (top + h + gap)
    xs = np.arange(cols) * (w + gap) + (np.arange(cols) > 0) * split
    canvas = np.full((ys[-1] + h, xs[-1] + w, *cells.shape[4:]), fill, dtype=cells.dtype)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            canvas[y : y + h, x : x + w] = cells[i, j]
    return canvas, ys, xs


def _scale(width: int, target: int) -> int:
    """Output pixels per image pixel (a whole number: crisp, even panels) that draw ``width`` at least ``target``."""
    return max(1, -(-target // max(width, 1)))


def _canvas_axes(shape: tuple[int, ...], scale: int, title: str, left: float = 0.0, right: float = 0.0):
    """A figure laid out exactly (saved without a second, measuring draw) and an axes showing an image of ``shape``
    at ``scale`` output pixels per pixel at :data:`DPI`, ``left``/``right`` inches beside it (row labels, a colour
    bar), ``title`` above; the figure is widened, the image centred, when the title is wider."""
    plt = _plt()
    h, w = shape[0] * scale / DPI, shape[1] * scale / DPI
    top = 0.32 if title else 0.04
    width = max(left + w + right, 0.075 * len(title) + 0.2) + 0.08  # 9-point characters average < 0.075 inch
    height = h + top + 0.04
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    x0 = left + (width - (left + w + right)) / 2
    ax = fig.add_axes((x0 / width, 0.04 / height, w / width, h / height))
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=9)
    return fig, ax


def _save_exact(fig, path: str | Path) -> None:
    """Save a figure of :func:`_canvas_axes` as laid out, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})  # half of 6's time, +10% size
    _plt().close(fig)


CHAR_INCH = 0.06  # a 7-point character's average width, generously


def _text_rows(lines: int, scale: int) -> int:
    """Image pixels above a row of panels for ``lines`` lines of 7-point labels."""
    return -(-(14 * lines + 2) // scale)


def _label_panels(ax, names: list[list[str]], ys: np.ndarray, xs: np.ndarray, width: float) -> None:
    """``names[r][c]`` centred over the panel of :func:`mosaic` row ``r``, column ``c`` (``width`` pixels wide), in
    the room left above its row."""
    for y, row in zip(ys, names, strict=True):
        for x, name in zip(xs, row, strict=True):
            ax.text(x + width / 2, y - 1, name, ha="center", va="bottom", fontsize=7)


def plot_ranked_lists(
    q_images: np.ndarray,
    g_images: np.ndarray,
    status: np.ndarray,
    path: str | Path,
    title: str = "",
    labels: np.ndarray | None = None,
    query_labels: list[str] | None = None,
) -> None:
    """One row per query: the query (``q_images`` (Q, H, W, 3)), then its top-k gallery images (``g_images``
    (Q, k, H, W, 3)) with green (match), red (wrong), grey (junk, same identity and camera, ignored by the protocol)
    or blue (identity of the query unknown: ``reid search``) borders. ``labels`` (Q, k) and ``query_labels`` replace
    the rank numbers and "query" over the images (lines split at "\\n"); a query label wider than its image gets
    room on the left."""
    nq, k = status.shape
    names = [
        [query_labels[r] if query_labels else "query"]
        + [str(labels[r, c]) if labels is not None else str(c + 1) for c in range(k)]
        for r in range(nq)
    ]
    lines = max(name.count("\n") + 1 for row in names for name in row)
    canvas, ys, xs, scale = ranked_canvas(q_images, g_images, status, lines)
    width = q_images.shape[2] + 2 * _border(q_images.shape[1:3])  # of a panel with its border
    widest = max(len(line) for row in names for line in row[0].split("\n"))
    left = max(0.0, (CHAR_INCH * widest - width * scale / DPI) / 2)  # half the overhang of the widest query label
    fig, ax = _canvas_axes(canvas.shape, scale, title, left=left)
    ax.imshow(canvas, interpolation="nearest")
    _label_panels(ax, names, ys, xs, width)
    _save_exact(fig, path)


RANK_COLOURS = {1: (25, 178, 25), 0: (217, 25, 25), -1: (153, 153, 153), 2: (38, 89, 204)}  # status → border RGB


def _border(size: tuple[int, int]) -> int:
    return max(2, round(min(size) / 20))


def ranked_canvas(
    q_images: np.ndarray, g_images: np.ndarray, status: np.ndarray, label_lines: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The pixels of :func:`plot_ranked_lists`: each gallery image in a border of its status's
    :data:`RANK_COLOURS` (junk images faded), the query in white, a wider gap after the query, room for
    ``label_lines`` lines of labels above each row. Returns (image (uint8), row tops, column lefts, scale)."""
    nq, k = status.shape
    h, w = q_images.shape[1:3]
    b = _border((h, w))
    cells = np.full((nq, k + 1, h + 2 * b, w + 2 * b, 3), 255, np.uint8)
    cells[:, 0, b:-b, b:-b] = q_images
    colours = np.array([RANK_COLOURS[int(v)] for v in status.ravel()], np.uint8).reshape(nq, k, 1, 1, 3)
    cells[:, 1:] = colours
    gallery = g_images.astype(np.float32)
    junk = status == -1
    gallery[junk] = gallery[junk] * 0.4 + 150
    cells[:, 1:, b:-b, b:-b] = gallery.clip(0, 255).astype(np.uint8)
    scale = _scale(w + 2 * b, 64)
    gap = max(2, (w + 2 * b) // 16)
    canvas, ys, xs = mosaic(cells, gap=gap, fill=255, top=_text_rows(label_lines, scale), split=2 * gap)
    return canvas, ys, xs, scale


def plot_ape_similarity(pos_embed: np.ndarray, grid: tuple[int, int], path: str | Path, title: str = "") -> None:
    """Cosine similarity of each patch's APE to every other patch's, as a grid of small maps (ViT paper, Fig. 7)."""
    plt = _plt()
    h, w = grid
    p = pos_embed / np.linalg.norm(pos_embed, axis=1, keepdims=True).clip(1e-12)
    sim = (p @ p.T).reshape(h, w, h, w)  # map (row, col): that patch's similarity to every patch
    canvas, _, _ = mosaic(sim.astype(np.float32), gap=1)
    title = title or "APE cosine similarity (one map per patch: its similarity to every patch)"
    fig, ax = _canvas_axes(canvas.shape, _scale(w + 1, 40), title, right=1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    shown = ax.imshow(canvas, vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
    box = ax.get_position()
    cax = fig.add_axes((box.x1 + 0.15 / fig.get_figwidth(), 0.2, 0.12 / fig.get_figwidth(), 0.6))
    fig.colorbar(shown, cax=cax, label="cosine similarity")
    _save_exact(fig, path)


def plot_rpe_bias(tables: np.ndarray, grid: tuple[int, int], path: str | Path, title: str = "") -> None:
    """RPE bias over 2-D offsets (Δrow, Δcol) for every layer (rows) and head (columns): each map coloured by its own
    largest |bias| (light grey: 0), each layer's largest written beside its row."""
    plt = _plt()
    h, w = grid
    layers, _, heads = tables.shape
    t = tables[:, : (2 * h - 1) * (2 * w - 1)].reshape(layers, 2 * h - 1, 2 * w - 1, heads).transpose(0, 3, 1, 2)
    peak = np.abs(t).max(axis=(2, 3), keepdims=True)
    scaled = (t / np.where(peak > 0, peak, 1.0)).astype(np.float32)
    scale = _scale(2 * w, 56)
    canvas, ys, xs = mosaic(scaled, gap=1, top=_text_rows(1, scale))
    fig, ax = _canvas_axes(canvas.shape, scale, title or "RPE bias by offset (centre = same patch)", left=0.8)
    ax.imshow(
        canvas, vmin=-1, vmax=1, cmap=plt.get_cmap("coolwarm").with_extremes(bad="white"), interpolation="nearest"
    )
    _label_panels(ax, [[f"h{head}" for head in range(heads)]], ys[:1], xs, 2 * w - 1)
    for layer, y in enumerate(ys):
        ax.text(-1, y + (2 * h - 1) / 2, f"L{layer} ±{peak[layer].max():.3g}", ha="right", va="center", fontsize=7)
    _save_exact(fig, path)


def plot_ablation_summary(summary: list[dict], curves: dict[str, list[list[dict]]], path: str | Path) -> None:
    """An ablation in one picture: each variant's mAP and Rank-1 (± std over seeds), its ΔmAP against the first
    variant with the 95% paired-bootstrap interval (over seeds and queries), and every variant's training loss
    (mean over seeds) on one axis, with the evaluation mAP during training when the runs recorded it
    (``--eval-every``)."""
    plt = _plt()
    labels = [r["variant"] for r in summary]
    y = np.arange(len(labels))[::-1]  # first variant on top
    with_eval = any(m and "eval_mAP" in m[-1] for runs in curves.values() for m in runs)
    fig, axes = plt.subplots(1, 3 + with_eval, figsize=(4.6 * (3 + with_eval), 0.5 * len(labels) + 2.4))
    for offset, metric, colour in ((0.2, "mAP", "tab:blue"), (-0.2, "Rank-1", "tab:orange")):
        values = [100 * r[metric] for r in summary]
        errors = [100 * r.get(metric + " std", 0.0) if r.get("runs", 1) > 1 else 0.0 for r in summary]
        spread = {"xerr": errors, "capsize": 3} if any(errors) else {}  # one seed: no error bars
        axes[0].barh(y + offset, values, height=0.38, color=colour, label=metric, **spread)
    top = max(100 * max(r["mAP"], r["Rank-1"]) for r in summary)
    axes[0].set(yticks=y, yticklabels=labels, xlabel="%", xlim=(0, 1.3 * top + 1e-9))  # room for the legend
    axes[0].set_title("mAP and Rank-1 (± std over seeds)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    for yi, r in zip(y, summary, strict=True):
        if "ΔmAP" in r:
            d, lo, hi = (100 * r[k] for k in ("ΔmAP", "ΔmAP low", "ΔmAP high"))
            axes[1].errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt="o", color="tab:blue", capsize=4)
            axes[1].annotate(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", (d, yi), xytext=(0, 7), textcoords="offset points",
                             ha="center", fontsize=7)  # fmt: skip
    axes[1].axvline(0, color="grey", linewidth=1)
    axes[1].annotate("reference", (0, y[0]), ha="center", va="center", fontsize=7, color="grey")
    ends = [0.0] + [100 * r[k] for r in summary if "ΔmAP" in r for k in ("ΔmAP low", "ΔmAP high")]
    span = max(max(ends) - min(ends), 1e-6)  # room beside the extreme points for the labels centred on them
    axes[1].set_xlim(min(ends) - 0.22 * span, max(ends) + 0.22 * span)
    axes[1].set(yticks=y, yticklabels=[], ylim=(y.min() - 0.5, y.max() + 0.5), xlabel="mAP points")
    over = "seeds and queries" if max(r.get("runs", 1) for r in summary) > 1 else "queries"
    axes[1].set_title(f"ΔmAP vs {labels[0]} (95% paired bootstrap over {over})", fontsize=9)
    for label in labels:
        _mean_curve(axes[2], curves.get(label, []), "loss", label)
        if with_eval:
            _mean_curve(axes[3], curves.get(label, []), "eval_mAP", label, marker="o")
    axes[2].set(xlabel="epoch")
    axes[2].set_title("training loss (mean over seeds)", fontsize=9)
    axes[2].legend(fontsize=7)
    if with_eval:
        axes[3].set(xlabel="epoch")
        axes[3].set_title("evaluation mAP during training", fontsize=9)
    _save(fig, path)


def _mean_curve(ax, runs: list[list[dict]], key: str, label: str, marker: str | None = None) -> None:
    """Plot ``key`` against the epoch, averaged over the runs (seeds) that recorded it at that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for metrics in runs:
        for m in metrics:
            if key in m:
                by_epoch.setdefault(m["epoch"], []).append(m[key])
    if by_epoch:
        epochs = sorted(by_epoch)
        ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], label=label, marker=marker)


def plot_roc(roc, path: str | Path, title: str = "") -> None:
    """``evaluate --roc``'s curve: TPR against FPR (log scale) up to the largest asked rate, the asked points
    marked with their values."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.plot(roc.curve_fpr, roc.curve_tpr, drawstyle="steps-post", lw=1.4)
    ax.scatter(roc.fpr, roc.tpr, s=18, zorder=3, color="tab:red")
    for f, t in zip(roc.fpr, roc.tpr, strict=True):
        ax.annotate(f"{t:.3f}", (f, t), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xscale="log", xlabel="false-positive rate (all pairs)", ylabel="true-positive rate", ylim=(0, 1.02))
    ax.set_title(title or f"ROC over {roc.positives:,} positive and {roc.negatives:,} negative pairs", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
