"""Market-1501 protocol metrics (CMC, mAP, mINP) by exact rank counting, chunked, on any torch device.

For a query, gallery items of the same pid *and* camera are junk (removed); positives are the same pid from another
camera. The 0-based rank of a positive is the number of valid items ranked before it: items with a higher score,
plus items with the same score and a smaller gallery index (stable tie-break). With the ranks r_1 < … < r_n of its
n positives, a query has ``AP = mean_i i / (r_i + 1)``, ``INP = n / (r_n + 1)`` and its first hit at r_1.

Counting needs no sort of the gallery: the positives' scores are few, so each gallery item is bucketed among them
with ``searchsorted`` and a histogram gives, for every positive, how many valid items beat it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QueryRanks", "MetricResult", "positive_ranks", "ranks_from_lists", "summarize", "chance_average_precision"]


@dataclass(frozen=True)
class QueryRanks:
    """Per query: 0-based ranks (among valid items) of its positives, ascending, padded with -1."""

    ranks: torch.Tensor  # (Q, P) int64
    num_pos: torch.Tensor  # (Q,) int64
    num_valid: torch.Tensor  # (Q,) int64: gallery items left after removing junk


@dataclass(frozen=True)
class MetricResult:
    mAP: float
    mINP: float
    cmc: list[float]  # rank 1 first, fractions
    num_valid_queries: int
    num_queries: int
    chance_mAP: float  # expected mAP of a uniformly random ranking of the same gallery
    approximate: bool = False

    def to_dict(self) -> dict:
        return {
            "mAP": self.mAP,
            "mINP": self.mINP,
            "cmc": self.cmc,
            "num_valid_queries": self.num_valid_queries,
            "num_queries": self.num_queries,
            "chance_mAP": self.chance_mAP,
            "approximate": self.approximate,
        }


def positive_ranks(
    scores: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, g_pids: torch.Tensor, g_camids: torch.Tensor
) -> QueryRanks:
    """Exact stable ranks of every positive for a chunk of queries; ``scores`` (Q, G), higher is more similar."""
    q, g = scores.shape
    dev = scores.device
    same_pid = q_pids[:, None] == g_pids[None, :]
    pos = same_pid & (q_camids[:, None] != g_camids[None, :])
    others = ~same_pid  # valid items that are not positives (junk = same pid, same camera, is neither)
    num_pos = pos.sum(1)
    num_valid = num_pos + others.sum(1)
    p_max = int(num_pos.max()) if q else 0
    if p_max == 0:
        return QueryRanks(torch.full((q, 0), -1, dtype=torch.long, device=dev), num_pos, num_valid)
    pos_scores, pos_index = _positives_in_order(scores, pos, p_max)  # (Q, P) best first, pads last
    is_pad = torch.arange(p_max, device=dev)[None, :] >= num_pos[:, None]
    asc = pos_scores.masked_fill(is_pad, float("inf")).sort(dim=1).values  # ascending, pads (+inf) last
    scores = scores.contiguous()
    # Bucket each other item by how many positives score strictly below it; it beats exactly those positives.
    below = torch.searchsorted(asc, scores, right=False).masked_fill_(~others, 0)
    hist = torch.zeros(q, p_max + 1, dtype=torch.long, device=dev)
    hist.scatter_add_(1, below, torch.ones_like(below))
    beats_asc = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # beats_asc[j]: others scoring > asc[j]
    desc = torch.arange(p_max, device=dev)[None, :]
    beats = beats_asc.gather(1, (num_pos[:, None] - 1 - desc).clamp_min(0))  # in best-first order
    beats += _tied_before(scores, asc, others, pos_scores, pos_index)
    ranks = (beats + desc).masked_fill(is_pad, -1)  # + better positives, which sit before it in order
    return QueryRanks(ranks, num_pos, num_valid)


def _positives_in_order(scores: torch.Tensor, pos: torch.Tensor, p_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives' scores and gallery indices sorted by score (desc), ties by index (asc); pads at -inf last."""
    masked = scores.masked_fill(~pos, float("-inf"))
    top_scores, top_index = masked.topk(p_max, dim=1)
    by_index = top_index.argsort(dim=1)
    top_scores, top_index = top_scores.gather(1, by_index), top_index.gather(1, by_index)
    order = top_scores.sort(dim=1, descending=True, stable=True).indices
    return top_scores.gather(1, order), top_index.gather(1, order)


def _tied_before(
    scores: torch.Tensor, asc: torch.Tensor, others: torch.Tensor, pos_scores: torch.Tensor, pos_index: torch.Tensor
) -> torch.Tensor:
    """(Q, P) count of other items with exactly a positive's score and a smaller gallery index (stable ties).

    Exact ties are rare (duplicate images), so the common case costs one extra searchsorted.
    """
    fix = torch.zeros_like(pos_index)
    tied = (torch.searchsorted(asc, scores, right=True) > torch.searchsorted(asc, scores, right=False)) & others
    if not bool(tied.any()):
        return fix
    qi, gi = tied.nonzero(as_tuple=True)
    step = max(1, (1 << 22) // pos_index.shape[1])
    for i in range(0, len(qi), step):
        q, k = qi[i : i + step], gi[i : i + step]
        hit = (pos_scores[q] == scores[q, k][:, None]) & (pos_index[q] > k[:, None])  # (T, P)
        fix.index_add_(0, q, hit.long())
    return fix


def ranks_from_lists(
    lists: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, g_pids: torch.Tensor, g_camids: torch.Tensor
) -> tuple[QueryRanks, torch.Tensor]:
    """Ranks of positives from ranked lists (Q, K) of gallery indices (−1 = empty slot).

    Returns the ranks found and a (Q,) mask of *complete* queries, whose every positive is in its list; the
    others must be completed by :func:`positive_ranks` (counting over the whole gallery).
    """
    q = lists.shape[0]
    filled = lists >= 0
    idx = lists.clamp_min(0)
    same_pid = (g_pids[idx] == q_pids[:, None]) & filled
    pos = same_pid & (g_camids[idx] != q_camids[:, None])
    valid = filled & ~(same_pid & ~pos)
    rank_in_valid = valid.long().cumsum(1) - 1  # 0-based rank among valid items
    num_pos_total, num_valid = _count_positives(q_pids, q_camids, g_pids, g_camids)
    found = pos.sum(1)
    p_max = int(num_pos_total.max()) if q else 0
    ranks = torch.full((q, max(p_max, 1)), -1, dtype=torch.long, device=lists.device)
    slot = pos.long().cumsum(1) - 1
    rows = torch.arange(q, device=lists.device)[:, None].expand_as(pos)
    keep = pos & (slot < ranks.shape[1])
    ranks[rows[keep], slot[keep]] = rank_in_valid[keep]
    return QueryRanks(ranks[:, :p_max], num_pos_total, num_valid), found == num_pos_total


def _count_positives(q_pids, q_camids, g_pids, g_camids, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and valid (non-junk) gallery items per query."""
    pos, valid = [], []
    for i in range(0, len(q_pids), chunk):
        same = g_pids[None, :] == q_pids[i : i + chunk, None]
        same_cam = g_camids[None, :] == q_camids[i : i + chunk, None]
        pos.append((same & ~same_cam).sum(1))
        valid.append(len(g_pids) - (same & same_cam).sum(1))
    empty = torch.zeros(0, dtype=torch.long, device=q_pids.device)
    return (torch.cat(pos), torch.cat(valid)) if pos else (empty, empty)


def chance_average_precision(num_pos: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """Expected AP of a uniformly random ranking with n positives among M items:
    ``H_M / M + (n−1)(M − H_M) / (M(M−1))`` (H_M the M-th harmonic number)."""
    n, m = num_pos.double(), num_valid.double()
    h = torch.special.digamma(m + 1) + 0.5772156649015329  # H_M
    second = torch.where(m > 1, (n - 1) * (m - h) / (m * (m - 1)).clamp_min(1), torch.zeros_like(m))
    return h / m + second


def summarize(parts: list[QueryRanks], max_rank: int = 50, approximate: bool = False) -> MetricResult:
    """CMC (first hit), mAP and mINP over all queries with at least one positive."""
    num_queries = sum(int(p.num_pos.shape[0]) for p in parts)
    cmc = torch.zeros(max_rank, dtype=torch.float64)
    ap_sum = inp_sum = chance_sum = 0.0
    n_valid = 0
    for part in parts:
        ok = part.num_pos > 0
        if not bool(ok.any()):
            continue
        ranks = part.ranks[ok].double().cpu()
        npos = part.num_pos[ok].cpu()
        valid = ranks >= 0
        hits = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
        ap = torch.where(valid, hits / (ranks + 1), torch.zeros_like(ranks)).sum(1) / npos
        last = ranks.gather(1, (npos - 1)[:, None])[:, 0]
        inp = npos.double() / (last + 1)
        first = ranks[:, 0].long()
        cmc += torch.bincount(first.clamp_max(max_rank), minlength=max_rank + 1)[:max_rank].double().cumsum(0)
        ap_sum += float(ap.sum())
        chance_sum += float(chance_average_precision(npos, part.num_valid[ok].cpu()).sum())
        inp_sum += float(inp.sum())
        n_valid += int(ok.sum())
    if n_valid == 0:
        nan = float("nan")
        return MetricResult(nan, nan, [nan] * max_rank, 0, num_queries, nan, approximate)
    return MetricResult(
        ap_sum / n_valid,
        inp_sum / n_valid,
        (cmc / n_valid).tolist(),
        n_valid,
        num_queries,
        chance_sum / n_valid,
        approximate,
    )
