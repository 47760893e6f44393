"""Ranked-list pictures from features plus the dataset's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidcli.data.store import read_dataset, read_images
from reidcli.errors import FormatError
from reidcli.report.plots import plot_ranked_lists
from reidcli.retrieval.evaluate import ranked_lists
from reidcli.retrieval.features import FeatureSplit

__all__ = ["write_ranked_lists", "list_status", "pages", "holds_images", "queries_by_ap"]


def holds_images(data: Path, split: str, features: FeatureSplit) -> bool:
    """Whether the dataset file's ``split`` holds the images these features rows were extracted from (same count,
    same first paths)."""
    _, parts = read_dataset(data, (split,), images=False)
    return len(parts[split]) == len(features) and parts[split].paths[:5] == features.paths[:5]


def list_status(lists: np.ndarray, query: FeatureSplit, gallery: FeatureSplit, rows: np.ndarray) -> np.ndarray:
    """1 = correct match, 0 = wrong, −1 = junk (same pid and camera: ignored by the protocol)."""
    same = gallery.pids[lists] == query.pids[rows, None]
    junk = same & (gallery.camids[lists] == query.camids[rows, None])
    return np.where(junk, -1, same.astype(int))


QUERIES_PER_PAGE = 16  # rows of one picture; more queries go to numbered pages


def pages(path: Path, rows: int) -> list[tuple[Path, slice, str]]:
    """(picture, its rows, title suffix) for ``rows`` query rows: ``path`` alone up to :data:`QUERIES_PER_PAGE`
    rows, else ``<stem>_01.png``, ``<stem>_02.png``, …"""
    starts = range(0, rows, QUERIES_PER_PAGE)
    if len(starts) <= 1:
        return [(path, slice(0, rows), "")]
    return [
        (
            path.with_name(f"{path.stem}_{n:02d}{path.suffix}"),
            slice(s, s + QUERIES_PER_PAGE),
            f" (page {n}/{len(starts)})",
        )
        for n, s in enumerate(starts, 1)
    ]


def queries_by_ap(per_query: dict | None, n: int, worst: bool = True) -> tuple[np.ndarray, list[str]]:
    """The ``n`` queries with the lowest (``worst``) or highest AP, in that order (ties: query order), and a label
    naming each one's AP; queries without a valid match have no AP and are left out."""
    if per_query is None:
        raise FormatError("--show worst/best needs each query's AP, and these features have no identities to score")
    ap = np.asarray(per_query["AP"], dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(ap))
    rows = valid[np.argsort(ap[valid] if worst else -ap[valid], kind="stable")][:n]
    return rows, [f"query {r}\nAP {ap[r]:.2f}" for r in rows]


def write_ranked_lists(
    path: Path,
    query: FeatureSplit,
    gallery: FeatureSplit,
    data: Path,
    n: int,
    top_k: int,
    rerank=None,
    rows: np.ndarray | None = None,
    query_labels: list[str] | None = None,
    note: str = "",
) -> list[Path]:
    """Ranked lists of ``n`` evenly spaced queries, or of the query ``rows`` given (with their ``query_labels``, and
    ``note`` added to the title); ``rerank`` (an EvalConfig) draws the re-ranked lists. Up to
    :data:`QUERIES_PER_PAGE` queries go to ``path``; more to ``<stem>_01.png``, ``<stem>_02.png``, … Returns the
    pictures written."""
    if not (holds_images(data, "query", query) and holds_images(data, "gallery", gallery)):
        raise FormatError(f"{data} does not hold the images these features were extracted from; pass the right --data")
    if rows is None:
        rows = np.unique(np.linspace(0, len(query) - 1, min(n, len(query))).astype(int))
    if rerank is not None:  # re-ranking needs every query: the neighbourhoods are joint
        lists = _reranked_lists(query, gallery, rows, top_k, rerank)
    else:
        lists = ranked_lists(FeatureSplit(query.feats[rows], query.pids[rows], query.camids[rows]), gallery, top_k)
    status = list_status(lists, query, gallery, rows)
    title = f"top-{top_k} of {len(rows)} queries" + (" after k-reciprocal re-ranking" if rerank is not None else "")
    title += note
    written = []
    for name, part, page in pages(path, len(rows)):
        q_img = read_images(data, "query", rows[part])
        g_img = read_images(data, "gallery", lists[part])  # (queries, top_k, H, W, 3)
        labels = query_labels[part] if query_labels is not None else None
        plot_ranked_lists(q_img, g_img, status[part], name, title=title + page, query_labels=labels)
        written.append(name)
    return written


def _reranked_lists(query: FeatureSplit, gallery: FeatureSplit, rows: np.ndarray, top_k: int, cfg) -> np.ndarray:
    import torch

    from reidcli.retrieval.evaluate import best_first, resolve_device
    from reidcli.retrieval.rerank import k_reciprocal_rerank

    dev = resolve_device(cfg.device)
    q = torch.from_numpy(np.asarray(query.feats, dtype=np.float32)).to(dev)
    g = torch.from_numpy(np.asarray(gallery.feats, dtype=np.float32)).to(dev)
    dist = k_reciprocal_rerank(q, g, cfg.k1, cfg.k2, cfg.lambda_value)
    k = min(top_k, len(gallery))
    return best_first(dist[torch.from_numpy(rows).to(dev)], k, descending=False).cpu().numpy()
