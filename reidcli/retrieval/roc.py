"""Retrieval read as verification: the true-positive rate at fixed false-positive rates over every query–gallery
pair (fast-reid's ``TEST.ROC``), with one global threshold on the score.

Pairs as the protocol has them: a gallery item of the query's pid and camera is junk and left out; the same pid
from another camera is a positive pair, any other pid a negative pair. For each asked FPR ``f`` the threshold is
the (m+1)-th largest negative score, m = ⌊f · negatives⌋, and a pair is accepted when its score is strictly above
it: at most m negatives pass (fewer on ties), so the TPR reported is the ROC's value at the largest FPR not above
``f``. (fast-reid reads the ROC point nearest ``f``, which may lie above it.)

Exact at any gallery size without holding every score: score blocks arrive one at a time, every positive score is
kept (there are few), and of the negatives only the largest ⌊max f · negatives⌋ + 1 — after the first block, only
those above the running threshold are looked at.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from reidcli.errors import ConfigError

__all__ = ["DEFAULT_FPRS", "RocResult", "RocCounter", "parse_fprs"]

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)


def parse_fprs(text: str) -> tuple[float, ...]:
    """``--fpr 1e-4,1e-3``: comma-separated rates in (0, 1), returned ascending without repeats."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise ConfigError(f"--fpr {text!r}: give comma-separated false-positive rates between 0 and 1, e.g. 1e-4,1e-3")
    return tuple(values)


@dataclass(frozen=True)
class RocResult:
    fpr: tuple[float, ...]  # asked
    tpr: tuple[float, ...]  # at FPR ≤ each asked rate
    threshold: tuple[float, ...]  # accepted: score > threshold
    positives: int
    negatives: int

    def to_dict(self) -> dict:
        return asdict(self)

    def named(self) -> dict[str, float]:
        """``{"TPR@FPR=1e-04": …}``, fast-reid's names."""
        return {f"TPR@FPR={f:.0e}": t for f, t in zip(self.fpr, self.tpr, strict=True)}


class RocCounter:
    """Takes score blocks (rows × the whole gallery) with their queries' labels; :meth:`result` gives the TPRs."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor, q_pids: torch.Tensor, fprs=DEFAULT_FPRS):
        self.g_pids, self.g_camids, self.fprs = g_pids, g_camids, tuple(fprs)
        sorted_pids = torch.sort(g_pids).values
        same = torch.searchsorted(sorted_pids, q_pids, right=True) - torch.searchsorted(sorted_pids, q_pids)
        self.negatives = len(q_pids) * len(g_pids) - int(same.sum())
        self.keep = min(math.floor(max(self.fprs) * self.negatives) + 1, self.negatives)  # the largest negatives
        self.top = torch.empty(0, device=g_pids.device)  # the largest negatives so far, descending
        self.pos: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor) -> None:
        scores = scores.float()
        same = q_pids[:, None] == self.g_pids[None, :]
        self.pos.append(scores[same & (q_camids[:, None] != self.g_camids[None, :])])
        neg = scores[~same]
        if len(self.top) >= self.keep:  # only scores above the running threshold can enter
            neg = neg[neg > self.top[-1]]
        merged = torch.cat([self.top, neg])
        if len(merged) > self.keep:
            self.top = merged.topk(self.keep).values  # descending
        else:
            self.top = merged.sort(descending=True).values

    def result(self) -> RocResult:
        pos = torch.sort(torch.cat(self.pos) if self.pos else torch.empty(0, device=self.top.device)).values
        tprs, thresholds = [], []
        for f in self.fprs:
            m = math.floor(f * self.negatives)
            t = float(self.top[m]) if m < len(self.top) else -math.inf  # the (m+1)-th largest negative
            above = len(pos) - int(torch.searchsorted(pos, torch.tensor([t], device=pos.device), right=True))
            tprs.append(above / len(pos) if len(pos) else math.nan)
            thresholds.append(t)
        return RocResult(self.fprs, tuple(tprs), tuple(thresholds), len(pos), self.negatives)
