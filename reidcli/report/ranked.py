"""Ranked-list pictures from features plus the dataset's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidcli.data.store import read_dataset
from reidcli.errors import FormatError
from reidcli.report.plots import plot_ranked_lists
from reidcli.retrieval.evaluate import ranked_lists
from reidcli.retrieval.features import FeatureSplit

__all__ = ["write_ranked_lists", "list_status"]


def list_status(lists: np.ndarray, query: FeatureSplit, gallery: FeatureSplit, rows: np.ndarray) -> np.ndarray:
    """1 = correct match, 0 = wrong, −1 = junk (same pid and camera: ignored by the protocol)."""
    same = gallery.pids[lists] == query.pids[rows, None]
    junk = same & (gallery.camids[lists] == query.camids[rows, None])
    return np.where(junk, -1, same.astype(int))


def write_ranked_lists(path: Path, query: FeatureSplit, gallery: FeatureSplit, data: Path, n: int, top_k: int) -> None:
    _, parts = read_dataset(data, ("query", "gallery"))
    q_img, g_img = parts["query"], parts["gallery"]
    if len(q_img) != len(query) or len(g_img) != len(gallery) or q_img.paths[:5] != query.paths[:5]:
        raise FormatError(f"{data} does not hold the images these features were extracted from; pass the right --data")
    rows = np.linspace(0, len(query) - 1, min(n, len(query))).astype(int)
    sub = FeatureSplit(query.feats[rows], query.pids[rows], query.camids[rows])
    lists = ranked_lists(sub, gallery, top_k)
    status = list_status(lists, query, gallery, rows)
    plot_ranked_lists(
        q_img.images[rows], g_img.images, lists, status, path, title=f"top-{top_k} of {len(rows)} queries"
    )
