"""The pictures of one trained variant: curves, APE similarity, RPE bias maps, RP relation vectors, ranked lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reidcli.engine.checkpoint import RunFiles, load_run_model, read_metrics
from reidcli.report.plots import _plt, _save, plot_ape_similarity, plot_rpe_bias, plot_training_curves

__all__ = ["variant_pictures", "plot_relation_vectors"]


def variant_pictures(variant, out: Path) -> list[Path]:
    """Write the pictures of ``variant`` (seed of the first run) into ``out``; return the paths written."""
    files = RunFiles(variant.run_dir)
    tag = f"{variant.pe}__{variant.loss.replace('+', '-')}"
    model, _, _ = load_run_model(files.root, "cpu")
    written = []
    metrics = read_metrics(files.metrics)
    written.append(out / f"curves_{tag}.png")
    plot_training_curves(metrics, written[-1], title=variant.label)
    grid = model.cfg.grid
    if model.pos is not None:
        written.append(out / f"ape_similarity_{tag}.png")
        plot_ape_similarity(model.pos.patch_embeddings().detach().numpy(), grid, written[-1], title=f"{tag}: APE")
    if model.rel_pos is not None:
        tables = torch.stack([r.relative_position_bias_table.detach() for r in model.rel_pos]).numpy()
        written.append(out / f"rpe_bias_{tag}.png")
        plot_rpe_bias(tables, grid, written[-1], title=f"{tag}: RPE bias by offset")
    if model.pos is not None or model.rel_pos is not None:
        written.append(out / f"relation_vectors_{tag}.png")
        plot_relation_vectors(model, variant.train.data, written[-1], variant.train.loss.top_n, title=tag)
    written.append(out / f"ranked_{tag}.png")
    _ranked(model, variant, written[-1])
    return written


def _triple(pids: np.ndarray) -> tuple[int, int, int]:
    """Indices of an anchor, a positive (same id) and a negative (another id)."""
    ids, counts = np.unique(pids, return_counts=True)
    pid = ids[np.argmax(counts >= 2)]
    same = np.flatnonzero(pids == pid)
    other = np.flatnonzero(pids != pid)
    return int(same[0]), int(same[1]), int(other[0])


@torch.no_grad()
def plot_relation_vectors(model, data: str, path: Path, top_n: int, title: str = "") -> None:
    """The RP-triplet relation vectors (C(N,2) values) of an anchor, a positive and a negative training image."""
    from reidcli.data.augment import normalize_batch
    from reidcli.data.store import read_dataset
    from reidcli.losses.positional import relation_vectors

    _, parts = read_dataset(data, ("train",))
    tr = parts["train"]
    idx = list(_triple(tr.pids))
    x = normalize_batch(torch.from_numpy(tr.images[idx]))
    model.eval()
    out = model(x)
    rel = relation_vectors(model, out.feat, out.tokens, top_n).numpy()
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), gridspec_kw={"width_ratios": [1, 1, 1, 5]})
    for ax, i, name in zip(axes[:3], idx, ("anchor", "positive", "negative"), strict=False):
        ax.imshow(tr.images[i])
        ax.set_title(f"{name} (pid {tr.pids[i]})", fontsize=8)
        ax.axis("off")
    for r, name in zip(rel, ("anchor", "positive", "negative"), strict=False):
        axes[3].plot(r, marker=".", label=name)
    axes[3].set(title=f"positional relation of the top-{top_n} patch pairs", xlabel="pair (rank order)")
    axes[3].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _ranked(model, variant, path: Path) -> None:
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
        feats = embed_dataset(model.to(device), variant.train.data, ("query", "gallery"), device)
    write_ranked_lists(path, feats["query"], feats["gallery"], Path(variant.train.data), 6, 8)
