"""Market-1501 protocol metrics (CMC, mAP, mINP) by exact rank counting, chunked, on any torch device.

For a query, gallery items of the same pid *and* camera are junk (removed); positives are the same pid from another
camera. The 0-based rank of a positive is the number of valid items ranked before it: items with a higher score,
plus items with the same score and a smaller gallery index (stable tie-break). With the ranks r_1 < … < r_n of its
n positives, a query has ``AP = mean_i i / (r_i + 1)``, ``INP = n / (r_n + 1)`` and its first hit at r_1.

Counting needs no sort of the whole gallery: only items scoring at least a query's weakest positive can beat one
of its positives. Those items get one integer key each (row, then the order-preserving bits of the score); one
sort of the keys and a binary search per positive count what beats it, exactly, ties by gallery row. Rows where
many items share one score (a collapsed model) are instead bucketed among the positives with ``searchsorted``
and a histogram. Both give identical ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "COUNTING",
    "QueryRanks",
    "MetricResult",
    "GalleryGroups",
    "positive_ranks",
    "ranks_in_blocks",
    "ranks_from_lists",
    "summarize",
    "chance_average_precision",
]


COUNTING = ("auto", "kernel", "sort", "count")  # the exact counting methods (see positive_ranks)


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


class GalleryGroups:
    """Gallery rows grouped by pid, so that a query's same-pid items are found without a (Q, G) comparison."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor):
        self.g_pids, self.g_camids = g_pids, g_camids
        # gallery rows in ascending pid, then row; one call gives the sorted pids too
        self.sorted_pids, self.order = torch.sort(g_pids, stable=True)

    def spans(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q,) start in :attr:`order` and (Q,) length of each query's pid group (length 0: no such pid)."""
        lo = torch.searchsorted(self.sorted_pids, q_pids)
        return lo, torch.searchsorted(self.sorted_pids, q_pids, right=True) - lo

    def same_pid(self, q_pids: torch.Tensor) -> torch.Tensor:
        """(Q, S) gallery rows of each query's pid, ascending, padded with −1."""
        lo, counts = self.spans(q_pids)
        width = int(counts.max()) if len(q_pids) else 0
        slot = torch.arange(width, device=q_pids.device)[None, :]
        idx = self.order[(lo[:, None] + slot).clamp_max(max(len(self.order) - 1, 0))]
        return torch.where(slot < counts[:, None], idx, -1)


def positive_ranks(
    scores: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    groups: GalleryGroups | None = None,
    method: str = "auto",
) -> QueryRanks:
    """Exact stable ranks of every positive for a chunk of queries; ``scores`` (Q, G), higher is more similar.

    Only items scoring at least a query's weakest positive can beat one of its positives. ``method``: "kernel"
    (one Triton kernel compares each row's items with its positives: see :mod:`reidcli.retrieval.rank_kernel`),
    "sort" (those items sorted once by (row, score), positives located by binary search: no histogram atomics,
    few host syncs), "count" (those items gathered when few, everything bucketed in place when many), or "auto":
    the kernel on a GPU, else sort, and count when many exact ties make the sort's tie-break loop long (e.g. a
    collapsed model's equal features). All are exact and give identical ranks (the kernel's rows are padded wider
    with −1).
    """
    if method not in COUNTING:
        raise ValueError(f"unknown counting method {method!r}")
    groups = groups or GalleryGroups(g_pids, g_camids)
    q, g = scores.shape
    dev = scores.device
    if method == "kernel" or (method == "auto" and scores.is_cuda and _kernel_usable()):
        ranked = _kernel_ranks(scores, groups, q_pids, q_camids, strict=method == "kernel")
        if ranked is not None:
            return QueryRanks(*ranked)
    same = groups.same_pid(q_pids)  # (Q, S) same-pid gallery rows: positives and junk
    has = same >= 0
    s_same = scores.gather(1, same.clamp_min(0)).masked_fill(~has, float("-inf"))
    is_pos = has & (g_camids[same.clamp_min(0)] != q_camids[:, None])
    num_pos = is_pos.sum(1)
    num_valid = g - (has & ~is_pos).sum(1)  # (small (Q, S) tensors: plain sums)
    p_max = int(num_pos.max()) if q else 0
    if p_max == 0:
        return QueryRanks(torch.full((q, 0), -1, dtype=torch.long, device=dev), num_pos, num_valid)
    # positives best first, ties by gallery row (``same`` is ascending, so a stable sort keeps that order)
    order = s_same.masked_fill(~is_pos, float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :p_max]
    pos_scores, pos_index = s_same.gather(1, order), same.gather(1, order)
    is_pad = torch.arange(p_max, device=dev)[None, :] >= num_pos[:, None]
    asc = pos_scores.masked_fill(is_pad, float("inf")).sort(dim=1).values.contiguous()  # ascending, pads last
    # Only items scoring at least the weakest positive can beat a positive.
    keep = scores >= asc[:, :1]
    beats = None
    if method != "count":
        beats = _sorted_beats(scores, keep, pos_scores, pos_index, max_ties=None if method == "sort" else 8)
    if beats is None:
        beats = _counted_beats(scores, keep, asc, num_pos, pos_scores, pos_index)
    # the same-pid items (positives and junk) were counted among the values: take them out again
    beats -= _count_beats(s_same.contiguous(), same, asc, num_pos, pos_scores, pos_index)
    desc = torch.arange(p_max, device=dev)[None, :]
    ranks = (beats + desc).masked_fill(is_pad, -1)  # + the better positives, which precede it in order
    return QueryRanks(ranks, num_pos, num_valid)


_KERNEL_FAILED: list[str] = []  # the first failure of the Triton kernel on this process's GPU, if any


def _kernel_usable() -> bool:
    if _KERNEL_FAILED:
        return False
    try:
        import reidcli.retrieval.rank_kernel  # noqa: F401  (imports Triton)
    except ImportError:
        return False
    return True


def _kernel_ranks(scores, groups, q_pids, q_camids, strict: bool):
    """The Triton kernel's (ranks, positives, valid items), or None where it cannot run: same-pid groups wider than
    it takes, or a failure (no compiler, an old Triton), which warns once and leaves the rest of the process to
    the torch methods. ``strict``: raise instead."""
    try:
        from reidcli.retrieval.rank_kernel import MAX_SAME, kernel_ranks

        lo, counts = groups.spans(q_pids)
        width = int(counts.max()) if len(q_pids) else 0
        if width > MAX_SAME and not strict:
            return None
        return kernel_ranks(scores, groups.order, lo, counts, width, q_pids, q_camids, groups.g_pids, groups.g_camids)
    except Exception as e:
        if strict:
            raise
        import warnings

        _KERNEL_FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(
            f"the Triton ranking kernel failed ({_KERNEL_FAILED[0][:200]}); counting with torch instead", stacklevel=2
        )
        return None


def ranks_in_blocks(
    scores: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    groups: GalleryGroups | None = None,
    distances: bool = False,
    method: str = "auto",
) -> list[QueryRanks]:
    """:func:`positive_ranks` over row blocks: on the CPU blocks of about 4 MiB of scores (cache-sized: 2-3×
    faster than large blocks on Market-size rows), on a GPU the whole chunk at once (fewest launches).
    ``distances``: the matrix holds distances (lower is more similar), negated block by block. ``method``: as
    :func:`positive_ranks`."""
    groups = groups or GalleryGroups(g_pids, g_camids)
    q, g = scores.shape
    block = q if scores.is_cuda else min(max(q, 1), max(16, (4 << 20) // (4 * max(g, 1))))
    parts = []
    for i in range(0, q, block):
        sub = -scores[i : i + block] if distances else scores[i : i + block]
        rows = slice(i, i + block)
        parts.append(positive_ranks(sub, q_pids[rows], q_camids[rows], g_pids, g_camids, groups, method))
    return parts


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 → int64 in [0, 2³²) with the same order (−0.0 counted equal to +0.0), for exact integer keys."""
    i = (x.float() + 0.0).view(torch.int32)  # + 0.0 turns −0.0 into +0.0
    i = torch.where(i < 0, i ^ 0x7FFFFFFF, i)  # negative floats: larger magnitude → smaller key
    return i.long() + 2**31


def _sorted_beats(
    scores: torch.Tensor,
    keep: torch.Tensor,
    pos_scores: torch.Tensor,
    pos_index: torch.Tensor,
    max_ties: int | None = None,
) -> torch.Tensor | None:
    """(Q, P) for each positive: items (same-pid ones included) with a higher score, or an equal score and a
    smaller gallery row. Only ``keep``'s items (at least the weakest positive) can, and every positive is kept.
    None when some score is shared by more than ``max_ties`` kept items of a row.

    The kept items get one int64 key each, row·2³² + order-preserving bits of the score; one 1-D sort of the keys
    puts every row's items in score order, and a binary search of each positive's key counts what lies above it.
    """
    q = scores.shape[0]
    row_keys = torch.arange(q, device=scores.device)[:, None] << 32
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, so each row's items are contiguous before sorting
    keys, perm = torch.sort((rows << 32) | _ordered_bits(scores[rows, cols]))
    cols = cols[perm]
    row_end = keep.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int64)  # (Q,): end of each row's segment
    p = pos_scores.shape[1]
    pos_keys = row_keys | _ordered_bits(pos_scores)
    lo = torch.searchsorted(keys, pos_keys.reshape(-1), right=False).view(q, p)
    hi = torch.searchsorted(keys, pos_keys.reshape(-1), right=True).view(q, p)
    beats = row_end[:, None] - hi  # strictly higher scores
    # equal scores: the positive itself, plus any exact duplicates (rare); count those with a smaller gallery row
    width = int((hi - lo).max()) if keys.numel() else 0
    if max_ties is not None and width > max_ties:
        return None  # many exact ties: the counting method handles them in one pass
    for o in range(width):
        at = (lo + o).clamp_max(max(len(cols) - 1, 0))
        beats += ((lo + o < hi) & (cols[at] < pos_index)).long()
    return beats


def _counted_beats(scores, keep, asc, num_pos, pos_scores, pos_index) -> torch.Tensor:
    """The counting method's (Q, P) beats: rows with few kept items (a good model) are gathered first, rows with
    many are bucketed in place."""
    q, g = scores.shape
    per_row = keep.sum(1, dtype=torch.int32).long()  # (an int32 sum of bools is ~15× faster on CPU)
    light = per_row * 4 <= g
    if int(light.sum()) * 2 < q:  # mostly heavy rows: count the whole chunk in place, no gathers or copies
        light = torch.zeros_like(light)
    beats = torch.empty_like(pos_index)
    for rows, compact in ((light.nonzero()[:, 0], True), ((~light).nonzero()[:, 0], False)):
        if len(rows):
            whole = len(rows) == q
            sub = scores if whole else scores[rows]
            if compact:
                values, columns = _compact(sub, keep if whole else keep[rows], per_row[rows])
            else:
                values, columns = sub.contiguous(), None
            beats[rows] = _count_beats(values, columns, asc[rows], num_pos[rows], pos_scores[rows], pos_index[rows])
    return beats


def _compact(scores: torch.Tensor, keep: torch.Tensor, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept items packed left: values (Q, M) padded with −inf, and their gallery rows (Q, M)
    padded with −1."""
    rows, cols = keep.nonzero(as_tuple=True)
    m = max(int(per_row.max()), 1)
    slot = torch.arange(len(rows), device=scores.device) - (per_row.cumsum(0) - per_row)[rows]
    values = torch.full((scores.shape[0], m), float("-inf"), device=scores.device)
    columns = torch.full(values.shape, -1, dtype=torch.long, device=scores.device)
    values[rows, slot] = scores[rows, cols]
    columns[rows, slot] = cols
    return values, columns


def _count_beats(
    values: torch.Tensor,
    columns: torch.Tensor | None,
    asc: torch.Tensor,
    num_pos: torch.Tensor,
    pos_scores: torch.Tensor,
    pos_index: torch.Tensor,
) -> torch.Tensor:
    """(Q, P) for each positive, best first: how many values rank before it (higher score, or equal score and a
    smaller gallery row). ``columns`` are the values' gallery rows (None: the value's column is its row)."""
    below = torch.searchsorted(asc, values, right=False, out_int32=True)  # (Q, M): positives strictly below
    return _beats(below, num_pos, asc.shape[1]) + _tied_before(values, columns, below, asc, pos_scores, pos_index)


def _beats(below: torch.Tensor, num_pos: torch.Tensor, p: int) -> torch.Tensor:
    """(Q, P) for each positive, best first: how many values score strictly above it.

    ``below`` (Q, M) buckets each value by how many positives score strictly below it: it beats exactly those.
    """
    q = below.shape[0]
    offsets = torch.arange(q, device=below.device, dtype=torch.int32)[:, None] * (p + 1)
    keys = (below + offsets).reshape(-1)
    hist = torch.bincount(keys, minlength=q * (p + 1)).view(q, p + 1)
    beats_asc = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # beats_asc[j]: values > the j-th smallest positive
    best_first = (num_pos[:, None] - 1 - torch.arange(p, device=below.device)[None, :]).clamp_min(0)
    return beats_asc.gather(1, best_first)


def _tied_before(
    values: torch.Tensor,
    columns: torch.Tensor | None,
    below: torch.Tensor,
    asc: torch.Tensor,
    pos_scores: torch.Tensor,
    pos_index: torch.Tensor,
) -> torch.Tensor:
    """(Q, P) how many of ``values`` equal a positive's score with a smaller gallery row (stable tie-break).

    Exact ties are rare (duplicate images): one gather finds them, and only they are compared in detail.
    """
    fix = torch.zeros_like(pos_index)
    p = asc.shape[1]
    tied = asc.gather(1, below.clamp_max(p - 1).long()) == values
    if not bool(tied.any()):
        return fix
    qi, ki = tied.nonzero(as_tuple=True)
    col = ki if columns is None else columns[qi, ki]
    step = max(1, (1 << 22) // p)
    for i in range(0, len(qi), step):
        rows, c, v = qi[i : i + step], col[i : i + step], values[qi[i : i + step], ki[i : i + step]]
        hit = (pos_scores[rows] == v[:, None]) & (pos_index[rows] > c[:, None])  # (T, P)
        fix.index_add_(0, rows, hit.long())
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
        all_pos = part.num_pos.cpu()  # small tensors: one copy each, then host arithmetic (no GPU launches)
        ok = all_pos > 0
        if not bool(ok.any()):
            continue
        ranks = part.ranks.cpu()[ok].double()
        npos = all_pos[ok]
        valid = ranks >= 0
        hits = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
        ap = torch.where(valid, hits / (ranks + 1), torch.zeros_like(ranks)).sum(1) / npos
        last = ranks.gather(1, (npos - 1)[:, None])[:, 0]
        inp = npos.double() / (last + 1)
        first = ranks[:, 0].long()
        cmc += torch.bincount(first.clamp_max(max_rank), minlength=max_rank + 1)[:max_rank].double().cumsum(0)
        ap_sum += float(ap.sum())
        chance_sum += float(chance_average_precision(npos, part.num_valid.cpu()[ok]).sum())
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
