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
CURVE_POINTS = 64


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
    curve_fpr: tuple[float, ...] = ()  # the curve, log-spaced up to the largest asked rate (for pictures)
    curve_tpr: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def named(self) -> dict[str, float]:
        """``{"TPR@FPR=1e-04": …}``, fast-reid's names."""
        return {f"TPR@FPR={f:.0e}": t for f, t in zip(self.fpr, self.tpr, strict=True)}


class RocCounter:
    """Takes score blocks (rows × the whole gallery) with their queries' labels; :meth:`result` gives the TPRs.

    Negatives above the running threshold (the ``keep``-th largest so far) are gathered, and cut back to the
    ``keep`` largest only when twice that many are waiting: a few selections over the whole gallery instead of one
    per block. Positives are gathered by pid group, without a mask over the block."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor, q_pids: torch.Tensor, fprs=DEFAULT_FPRS):
        from reidcli.retrieval.metrics import GalleryGroups

        self.g_pids, self.fprs = g_pids, tuple(fprs)
        self.groups = GalleryGroups(g_pids, g_camids)
        same = self.groups.spans(q_pids)[1]
        self.negatives = len(q_pids) * len(g_pids) - int(same.sum())
        self.keep = min(math.floor(max(self.fprs) * self.negatives) + 1, self.negatives)  # the largest negatives
        self.top = torch.empty(0, device=g_pids.device)  # the largest negatives so far
        self.threshold = -math.inf  # below it no negative can be among the largest ``keep``
        self.waiting: list[torch.Tensor] = []
        self.num_waiting = 0
        self.pos: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, scratch: bool = False) -> None:
        """``scratch``: ``scores`` may be overwritten (a block nobody reads afterwards)."""
        scores = scores.float()
        same, is_pos, _, _ = self.groups.members(q_pids, q_camids)  # (rows, S) same-pid gallery rows, −1 padded
        self.pos.append(scores.gather(1, same.clamp_min(0))[is_pos])
        neg = scores if scratch else scores.clone()
        neg.masked_fill_(q_pids[:, None] == self.g_pids[None, :], -math.inf)  # positives and junk are no negatives
        flat = neg.view(-1)
        cand = flat[flat > self.threshold]
        if len(cand):
            self.waiting.append(cand)
            self.num_waiting += len(cand)
        if self.num_waiting >= 2 * self.keep:
            self._cut()

    def _cut(self) -> None:
        """``top`` becomes the ``keep`` largest of itself and the waiting scores (in no order): a selection
        (``kthvalue``, about half of ``topk``'s time on the CPU), then the scores above it and enough ties."""
        merged = torch.cat([self.top, *self.waiting])
        self.waiting, self.num_waiting = [], 0
        if len(merged) <= self.keep:
            self.top = merged
            return
        kth = merged.kthvalue(len(merged) - self.keep + 1).values  # the keep-th largest
        above = merged[merged > kth]
        self.top = torch.cat([above, kth.expand(self.keep - len(above))])
        self.threshold = float(kth)

    def result(self, points: int = CURVE_POINTS) -> RocResult:
        """The TPRs at the asked FPRs, and the curve at ``points`` FPRs spaced evenly in log from one negative in
        all of them to the largest asked rate."""
        self._cut()
        pos = torch.sort(torch.cat(self.pos).cpu() if self.pos else torch.empty(0)).values
        top = self.top.cpu().sort(descending=True).values
        curve_fprs = list(self.fprs)
        if self.negatives:
            grid = torch.logspace(
                math.log10(1 / self.negatives), math.log10(max(self.fprs)), points, dtype=torch.float64
            )
            curve_fprs = sorted({float(f) for f in grid} | set(self.fprs))
        m = torch.tensor([math.floor(f * self.negatives) for f in curve_fprs], dtype=torch.long)
        # the (m+1)-th largest negative; pairs strictly above it are accepted (−∞ when every negative may pass)
        thresholds = torch.full((len(m),), -math.inf)
        inside = m < len(top)
        thresholds[inside] = top[m[inside]].float()
        above = len(pos) - torch.searchsorted(pos, thresholds.to(pos.dtype), right=True)
        tprs = (above.double() / len(pos)).tolist() if len(pos) else [math.nan] * len(m)
        at = {f: (t, float(th)) for f, t, th in zip(curve_fprs, tprs, thresholds.tolist(), strict=True)}
        return RocResult(
            self.fprs,
            tuple(at[f][0] for f in self.fprs),
            tuple(at[f][1] for f in self.fprs),
            len(pos),
            self.negatives,
            tuple(curve_fprs),
            tuple(tprs),
        )
