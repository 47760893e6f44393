"""Pictures (matplotlib, PNG, written atomically): training curves, ranked lists, position maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidcli.fileio import atomic_path

__all__ = ["plot_training_curves", "plot_ranked_lists", "plot_ape_similarity", "plot_rpe_bias", "plot_ablation_summary"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, tight: bool = True) -> None:
    plt = _plt()
    if tight:
        fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
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
    the rank numbers and "query" over the images."""
    plt = _plt()
    nq, k = status.shape
    tall = 2.1 + 0.25 * (labels is not None)
    fig, axes = plt.subplots(nq, k + 1, figsize=(1.0 * (k + 1), tall * nq), squeeze=False)
    colours = {1: (0.1, 0.7, 0.1), 0: (0.85, 0.1, 0.1), -1: (0.6, 0.6, 0.6), 2: (0.15, 0.35, 0.8)}
    for r in range(nq):
        axes[r, 0].imshow(q_images[r])
        axes[r, 0].set_title(query_labels[r] if query_labels else "query", fontsize=7)
        for c in range(k):
            ax = axes[r, c + 1]
            img = g_images[r, c].astype(np.float32)
            if status[r, c] == -1:
                img = img * 0.4 + 150
            ax.imshow(img.clip(0, 255).astype(np.uint8))
            ax.set_title(str(labels[r, c]) if labels is not None else str(c + 1), fontsize=7)
            for s in ax.spines.values():
                s.set(color=colours[int(status[r, c])], linewidth=3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_ape_similarity(pos_embed: np.ndarray, grid: tuple[int, int], path: str | Path, title: str = "") -> None:
    """Cosine similarity of each patch's APE to every other patch's, as a grid of small maps (ViT paper, Fig. 7)."""
    plt = _plt()
    h, w = grid
    p = pos_embed / np.linalg.norm(pos_embed, axis=1, keepdims=True).clip(1e-12)
    sim = p @ p.T  # (N, N)
    fig, axes = plt.subplots(h, w, figsize=(0.8 * w + 1.2, 0.8 * h + 0.8), squeeze=False)
    for i in range(h * w):
        ax = axes[i // w, i % w]
        shown = ax.imshow(sim[i].reshape(h, w), vmin=-1, vmax=1, cmap="viridis")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(right=0.8, wspace=0.1, hspace=0.1)
    fig.colorbar(shown, cax=fig.add_axes([0.85, 0.3, 0.03, 0.4]), label="cosine similarity")
    fig.suptitle(title or "APE cosine similarity (one map per patch: its similarity to every patch)", fontsize=9)
    _save(fig, path, tight=False)


def plot_rpe_bias(tables: np.ndarray, grid: tuple[int, int], path: str | Path, title: str = "") -> None:
    """RPE bias over 2-D offsets (Δrow, Δcol) for every layer (rows) and head (columns)."""
    plt = _plt()
    h, w = grid
    layers, _, heads = tables.shape
    t = tables[:, : (2 * h - 1) * (2 * w - 1)].reshape(layers, 2 * h - 1, 2 * w - 1, heads)
    fig, axes = plt.subplots(layers, heads, figsize=(0.9 * heads + 1, 1.4 * layers + 0.6), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(t[layer, :, :, head], cmap="coolwarm")
            ax.set_xticks([])
            ax.set_yticks([])
            if head == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
            if layer == 0:
                ax.set_title(f"h{head}", fontsize=7)
    fig.suptitle(title or "RPE bias by offset (centre = same patch)", fontsize=9)
    _save(fig, path)


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
