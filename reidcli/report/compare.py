"""Paired comparison of two evaluations of the same queries (``per_query.csv`` from ``reid evaluate --out``).

Two models evaluated on one query/gallery set differ query by query; a difference of mAP is only worth reporting
if it survives resampling the queries. :func:`compare` gives each metric of A and B, their difference B − A, a
95% percentile interval of that difference from a paired bootstrap over queries (the same resampled queries for
both, as in Koehn 2004 for MT metrics), and the two-sided bootstrap p-value of "no difference".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reidcli.errors import FormatError

__all__ = ["PER_QUERY_COLUMNS", "write_per_query", "read_per_query", "compare", "compare_runs", "Comparison", "holm"]

PER_QUERY_COLUMNS = ("query", "path", "pid", "camid", "positives", "first_hit_rank", "AP", "INP")
_KEY = ("path", "pid", "camid", "positives")  # the same query against the same gallery has the same positives


def write_per_query(path: str | Path, query, per_query: dict | None) -> None:
    """``per_query.csv``: one row per query of the ``query`` split (a FeatureSplit): its path, pid, camera, number
    of positives, first-hit rank (1-based), AP and INP (empty for a query without a match), written atomically.
    Nothing when the evaluation kept no per-query results."""
    from reidcli.fileio import atomic_path

    if per_query is None:
        return
    table = pd.DataFrame(
        {
            "query": range(len(query)),
            "path": query.paths if len(query.paths) == len(query) else [""] * len(query),
            "pid": query.pids,
            "camid": query.camids,
            "positives": per_query["positives"],
            "first_hit_rank": pd.array(per_query["first_hit_rank"], dtype="Int64"),
            "AP": per_query["AP"],
            "INP": per_query["INP"],
        }
    )
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)


def read_per_query(path: str | Path) -> pd.DataFrame:
    """A ``per_query.csv`` (or the ``reid evaluate --out`` folder holding one), checked for its columns."""
    path = Path(path)
    if path.is_dir():
        path = path / "per_query.csv"
    if not path.is_file():
        raise FormatError(f"{path} not found; write it with 'reid evaluate FEATURES --out DIR' (DIR/per_query.csv)")
    with path.open("rb") as f:
        signature = f.read(8)
    if signature == b"\x89HDF\r\n\x1a\n":  # a features (or dataset) file given instead
        raise FormatError(
            f"{path} is an HDF5 file, not an evaluation; evaluate it with 'reid evaluate {path} --out DIR' "
            "and compare the DIR folders"
        )
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values={"first_hit_rank": [""], "AP": [""], "INP": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not a per-query CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in PER_QUERY_COLUMNS if c not in table.columns]
    if missing:
        raise FormatError(f"{path} lacks the columns {', '.join(missing)}; write it with 'reid evaluate --out'")
    for column in ("positives", "first_hit_rank", "AP", "INP"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise FormatError(
                f"{path}: column {column} holds {table[column].iloc[row]!r} at query row {row}, not a number; "
                "write it again with 'reid evaluate --out'"
            )
        table[column] = values
    return table


@dataclass(frozen=True)
class Comparison:
    rows: list[dict]  # per metric: metric, A, B, delta, low, high, p
    queries: int  # queries with a match, the ones the metrics average over
    better: int  # queries whose AP is higher in B
    worse: int
    resamples: int

    def to_dict(self) -> dict:
        return {
            "metrics": self.rows,
            "queries": self.queries,
            "b_better": self.better,
            "b_worse": self.worse,
            "resamples": self.resamples,
        }


def compare(a: pd.DataFrame, b: pd.DataFrame, resamples: int = 10_000, seed: int = 0) -> Comparison:
    """mAP, Rank-1 and mINP of A and B over their valid queries, B − A with a paired-bootstrap 95% interval and
    p-value. A and B must hold the same queries in the same order against the same gallery."""
    return compare_runs([(a, b)], resamples, seed)


def compare_runs(pairs: list[tuple[pd.DataFrame, pd.DataFrame]], resamples: int = 10_000, seed: int = 0) -> Comparison:
    """:func:`compare` over several (A, B) pairs of the same queries, one per training seed: the metrics are
    averaged over the pairs. With two or more pairs the bootstrap is two-level (hierarchical): each resample draws
    the seeds with replacement, then the queries, so that the interval covers the choice of training seeds as well
    as of queries (a difference that one lucky seed makes does not come out as certain)."""
    if resamples < 100:
        raise FormatError(f"--resamples {resamples} is too few for a 95% interval; use at least 1000")
    metrics = [_paired_metrics(a, b) for a, b in pairs]
    if any(m[0].shape != metrics[0][0].shape for m in metrics):
        raise FormatError("the pairs hold different queries; compare evaluations of one query and gallery split")
    per = {name: np.mean([m[k] for m in metrics], axis=0) for k, name in enumerate(("A", "B"))}
    diffs = np.stack([b - a for a, b in metrics])  # (seeds, 3 metrics, queries)
    diff = diffs.mean(axis=0)
    boot = _bootstrap_means(diffs, resamples, seed)  # (resamples, 3)
    rows = []
    for k, metric in enumerate(("mAP", "Rank-1", "mINP")):
        delta = float(diff[k].mean())
        low, high = np.percentile(boot[:, k], [2.5, 97.5])
        # two-sided: how often the resampled difference falls on the other side of zero (or on it)
        p = 1.0 if delta == 0 else min(1.0, 2 * float(np.mean(boot[:, k] <= 0 if delta > 0 else boot[:, k] >= 0)))
        rows.append(
            {
                "metric": metric,
                "A": float(per["A"][k].mean()),
                "B": float(per["B"][k].mean()),
                "delta": delta,
                "low": float(low),
                "high": float(high),
                "p": p,
            }
        )
    return Comparison(rows, diff.shape[1], int((diff[0] > 0).sum()), int((diff[0] < 0).sum()), resamples)


def _paired_metrics(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(AP, Rank-1 hit, INP) × valid queries for A and for B, after checking they are the same queries."""
    if len(a) != len(b):
        raise FormatError(
            f"A has {len(a)} queries and B {len(b)}; evaluate both models on the same features' query split"
        )
    for col in _KEY:
        differs = np.flatnonzero(a[col].to_numpy() != b[col].to_numpy())
        if len(differs):
            i = int(differs[0])
            raise FormatError(
                f"A and B differ at query row {i} ({col}: {a[col].iloc[i]!r} vs {b[col].iloc[i]!r}); compare "
                "evaluations of the same query and gallery split"
            )
    valid = a["AP"].notna().to_numpy()
    if not valid.any():
        raise FormatError("no query has a match in these evaluations; nothing to compare")
    return tuple(
        np.stack(
            [
                t["AP"].to_numpy(float)[valid],
                (t["first_hit_rank"].to_numpy(float)[valid] == 1).astype(float),
                t["INP"].to_numpy(float)[valid],
            ]
        )  # (3 metrics, queries)
        for t in (a, b)
    )


def _bootstrap_means(diffs: np.ndarray, resamples: int, seed: int, batch: int = 500) -> np.ndarray:
    """(resamples, metrics) means of ``diffs`` (seeds, metrics, n): per resample the seeds are drawn with
    replacement (only when there are several), then n queries with replacement (the same queries for every drawn
    seed: they are one query set). Drawn in batches so memory stays at batch × n counts."""
    rng = np.random.default_rng(seed)
    num_seeds, num_metrics, n = diffs.shape
    out = np.empty((resamples, num_metrics))
    flat = diffs.reshape(num_seeds * num_metrics, n).T  # (n, seeds · metrics): one product per batch
    for start in range(0, resamples, batch):
        m = min(batch, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(m)])  # (m, n)
        per_seed = (counts @ flat).reshape(m, num_seeds, num_metrics) / n  # (m, seeds, metrics)
        if num_seeds == 1:
            out[start : start + m] = per_seed[:, 0]
            continue
        drawn = np.stack([np.bincount(rng.integers(0, num_seeds, num_seeds), minlength=num_seeds) for _ in range(m)])
        out[start : start + m] = np.einsum("rs,rsk->rk", drawn, per_seed) / num_seeds  # drawn seeds' mean
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order): several models compared with one baseline at a
    family-wise error rate of α when each adjusted p is held against α."""
    order = np.argsort(pvalues, kind="stable")
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
