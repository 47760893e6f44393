"""Market-1501 protocol metrics (CMC, mAP, mINP) by exact rank counting, chunked, on any torch device.

For a query, gallery items of the same pid *and* camera are junk (removed); positives are the same pid from another
camera. The 0-based rank of a positive is the number of valid items ranked before it: items with a higher score,
plus items with the same score and a smaller gallery index (stable tie-break). With the ranks r_1 < … < r_n of its
n positives, a query has ``AP = mean_i i / (r_i + 1)``, ``INP = n / (r_n + 1)`` and its first hit at r_1.

Counting needs no sort of the whole gallery: only items scoring at least a query's weakest positive can beat one
of its positives. On the CPU a compiled scan (``_cpu.c``) compares every item of a row with eight of its
positives at a time, in cache, with no sort and no gather. Its torch fallback gives those items one integer key
each (row, then the order-preserving bits of the score), searches each key among the positives' keys and takes a
histogram of how many positives each item is above (the weakest positives of a weak model are counted by plain
comparison passes instead); the GPU's torch method sorts the keys once and searches each positive among them; on a
GPU a Triton kernel does it all. All count exactly, ties by gallery row, and give identical ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reidcli.retrieval import native

__all__ = [
    "COUNTING",
    "QueryRanks",
    "MetricResult",
    "GalleryGroups",
    "positive_ranks",
    "ranks_in_blocks",
    "cpu_block_rows",
    "scan_available",
    "ranks_from_lists",
    "summarize",
    "chance_average_precision",
]


COUNTING = ("auto", "kernel", "scan", "sort", "count")  # the exact counting methods (see positive_ranks)


@dataclass(frozen=True)
class QueryRanks:
    """Per query: 0-based ranks (among valid items) of its positives, ascending, padded with -1."""

    ranks: torch.Tensor  # (Q, P) int64
    num_pos: torch.Tensor  # (Q,) int64
    num_valid: torch.Tensor  # (Q,) int64: gallery items left after removing junk
    rows: torch.Tensor | None = None  # (Q,) int64: the query rows these are (None: not tracked)

    def at(self, rows: torch.Tensor) -> QueryRanks:
        """The same ranks, labelled with the query rows they belong to."""
        return QueryRanks(self.ranks, self.num_pos, self.num_valid, rows)

    def take(self, mask: torch.Tensor) -> QueryRanks:
        """The rows where ``mask`` is true, labels kept."""
        rows = None if self.rows is None else self.rows[mask]
        return QueryRanks(self.ranks[mask], self.num_pos[mask], self.num_valid[mask], rows)


@dataclass(frozen=True)
class MetricResult:
    mAP: float
    mINP: float
    cmc: list[float]  # rank 1 first, fractions
    num_valid_queries: int
    num_queries: int
    chance_mAP: float  # expected mAP of a uniformly random ranking of the same gallery
    approximate: bool = False
    # per query row, where every part was labelled: "positives", "first_hit_rank" (1-based), "AP", "INP" (NaN for a
    # query without positives); not in to_dict (that is the summary)
    per_query: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

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

    def members(self, q_pids: torch.Tensor, q_camids: torch.Tensor):
        """Each query's same-pid rows (Q, S) (−1 padded), which of them are positives (another camera), and per
        query the number of positives and of valid (non-junk) gallery items."""
        same = self.same_pid(q_pids)
        has = same >= 0
        is_pos = has & (self.g_camids[same.clamp_min(0)] != q_camids[:, None])
        return same, is_pos, is_pos.sum(1), len(self.g_pids) - (has & ~is_pos).sum(1)


def positive_ranks(
    scores: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    groups: GalleryGroups | None = None,
    method: str = "auto",
    distances: bool = False,
) -> QueryRanks:
    """Exact stable ranks of every positive for a chunk of queries; ``scores`` (Q, G), higher is more similar, or
    lower when ``distances``.

    ``method``: "kernel" (one Triton kernel compares each row's items with its positives on a GPU: see
    :mod:`reidcli.retrieval.rank_kernel`), "scan" (the compiled CPU scan, eight positives per pass over a row: see
    ``_cpu.c``), "sort" (the items at least a row's weakest positive sorted once by (row, score), positives
    located by binary search: no histogram atomics, few host syncs), "count" (each such item's key searched among
    the positives', then one histogram: no sort; see :func:`_counted_beats`), or "auto": on the CPU the scan where
    it is built (see :func:`_use_scan`), else count; on a GPU the kernel, else sort, and count when many exact ties
    make the sort's tie-break loop long. All are exact and give identical ranks (the kernel's rows are padded
    wider with −1).
    """
    if method not in COUNTING:
        raise ValueError(f"unknown counting method {method!r}")
    groups = groups or GalleryGroups(g_pids, g_camids)
    q, g = scores.shape
    dev = scores.device
    if method == "kernel" or (method == "auto" and scores.is_cuda and _kernel_usable()):
        ranked = _kernel_ranks(-scores if distances else scores, groups, q_pids, q_camids, strict=method == "kernel")
        if ranked is not None:
            return QueryRanks(*ranked)
    same, is_pos, num_pos, num_valid = groups.members(q_pids, q_camids)  # (Q, S): positives and junk
    scan = _use_scan(method, scores)
    if distances and not scan:
        scores = -scores  # the scan negates as it reads
    s_same = scores.gather(1, same.clamp_min(0))
    s_same = (-s_same if distances and scan else s_same).masked_fill(same < 0, float("-inf"))
    p_max = int(num_pos.max()) if q else 0
    if p_max == 0:
        return QueryRanks(torch.full((q, 0), -1, dtype=torch.long, device=dev), num_pos, num_valid)
    # positives best first, ties by gallery row (``same`` is ascending, so a stable sort keeps that order)
    order = s_same.masked_fill(~is_pos, float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :p_max]
    pos_scores, pos_index = s_same.gather(1, order), same.gather(1, order)
    is_pad = torch.arange(p_max, device=dev)[None, :] >= num_pos[:, None]
    if scan:
        beats = _scanned_beats(scores, distances, pos_scores, pos_index, num_pos)
    else:
        asc = pos_scores.masked_fill(is_pad, float("inf")).sort(dim=1).values.contiguous()  # ascending, pads last
        # Only items scoring at least the weakest positive can beat a positive.
        keep = scores >= asc[:, :1]
        beats = None
        if method == "sort" or (method == "auto" and scores.is_cuda):
            beats = _sorted_beats(scores, keep, pos_scores, pos_index, max_ties=None if method == "sort" else 8)
        if beats is None:
            beats = _counted_beats(scores, keep, asc, num_pos, pos_scores, pos_index)
    # the same-pid items (positives and junk) were counted among the values: take them out again
    beats -= _same_pid_beats(s_same, same, pos_scores, pos_index)
    desc = torch.arange(p_max, device=dev)[None, :]
    ranks = (beats + desc).masked_fill(is_pad, -1)  # + the better positives, which precede it in order
    return QueryRanks(ranks, num_pos, num_valid)


def scan_available() -> bool:
    """Whether the compiled CPU counting (``reidcli/retrieval/_cpu.c``) was built at install time."""
    return native.available()


def _use_scan(method: str, scores: torch.Tensor) -> bool:
    """Whether to count by the compiled scan: asked for, or "auto" on the CPU where it is built. It compares every
    item with every positive (eight at a time), the torch counting only items at least a row's weakest positive,
    yet the scan was the faster at every size tried: 3× (trained) to 7× (weak) at Market's 17.5 positives a row,
    5–14× at 133–442, 14–33× at 1,326–3,315 (2 AMD EPYC cores, AVX-512)."""
    if method == "scan":
        if scores.is_cuda or not scan_available():
            raise ValueError("the 'scan' counting runs on the CPU and needs the compiled module (pip install -e .)")
        return True
    return method == "auto" and not scores.is_cuda and scan_available()


def _scanned_beats(scores, negate: bool, pos_scores, pos_index, num_pos) -> torch.Tensor:
    """The scan's (Q, P) beats, best first: items with a higher score than the positive, or an equal score and a
    smaller gallery row (same-pid items included); row ranges on torch's CPU threads. ``negate``: ``scores`` are
    distances."""
    mod = native.module()
    scores = scores.float().contiguous()
    q, g = scores.shape
    p = pos_scores.shape[1]
    ps = pos_scores.float().contiguous()  # scores (higher is better) even when the items are distances
    pi, npos = pos_index.long().contiguous(), num_pos.long().contiguous()
    out = torch.empty((q, p), dtype=torch.long)
    ptrs = (scores.data_ptr(), g, negate, ps.data_ptr(), pi.data_ptr(), npos.data_ptr(), p)
    native.over_rows(q, lambda r0, r1: mod.count_beats(*ptrs, r0, r1, out.data_ptr()))
    return out


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


_CPU_BLOCK_BYTES = 16 << 20  # scores per CPU block (Market rows: 4–16 MiB within 3%, 1 MiB 1.3–2× slower)


def cpu_block_rows(num_gallery: int) -> int:
    """Query rows per CPU block: about 16 MiB of float32 scores (the GEMM writes them while the counting's passes
    still find them in cache)."""
    return max(16, _CPU_BLOCK_BYTES // (4 * max(num_gallery, 1)))


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
    """:func:`positive_ranks` over row blocks: on a GPU, and on the CPU for the scan, the whole chunk at once
    (fewest launches and thread switches); the CPU's torch counting in blocks of :func:`cpu_block_rows`.
    ``distances``: the matrix holds distances (lower is more similar): the scan reads them as they are, the torch
    methods negate each block. ``method``: as :func:`positive_ranks`."""
    groups = groups or GalleryGroups(g_pids, g_camids)
    q, g = scores.shape
    block = q if scores.is_cuda else min(max(q, 1), cpu_block_rows(g))
    if _use_scan(method, scores):
        # the scan reads each row once, in any block: one call keeps the switches between torch's threads (which
        # spin a while after each operation) and the scan's to one per chunk (Market: 28 → 16 ms)
        block = max(q, 1)
    parts = []
    for i in range(0, q, block):
        rows = slice(i, i + block)
        parts.append(
            positive_ranks(scores[rows], q_pids[rows], q_camids[rows], g_pids, g_camids, groups, method, distances)
        )
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


_DENSE_SHARE = 0.1  # share of a block kept above which its weakest positive is counted in place, not gathered


def _counted_beats(scores, keep, asc, num_pos, pos_scores, pos_index) -> torch.Tensor:
    """The counting method's (Q, P) beats, best first: items with a higher score than the positive, or an equal
    score and a smaller gallery row (same-pid items included). ``keep``: the items at least the weakest positive.

    Every kept item gets one integer key, row·2³² + order-preserving score bits; one binary search in the rows'
    positives' keys (a few thousand per block: they stay in cache) tells how many positives of its row it is above,
    and one histogram of those counts gives every positive's number of higher-scored items, with no sort of the
    items. Where much of a block is kept (a weak model ranks some positives far down), its weakest positives are
    counted in place instead, one comparison pass each over the block, and only items at least the next positive
    are gathered: a pass costs less than gathering and searching more than a tenth of the block.
    """
    q, g = scores.shape
    p = asc.shape[1]
    dev = scores.device
    scores = scores.contiguous()
    above = torch.empty((q, p), dtype=torch.long, device=dev)  # ascending: items scoring strictly above asc[:, j]
    fix = torch.zeros((q, p), dtype=torch.long, device=dev)  # best first: equal items with a smaller gallery row
    dense = 0  # positives counted in place, weakest first
    kept = _count_true(keep)
    while dense < p - 1 and kept > _DENSE_SHARE * q * g:
        level = asc[:, dense : dense + 1]
        above[:, dense] = (scores > level).sum(1, dtype=torch.int32)
        # items equal to this positive besides itself (rare): compare their gallery rows, row by row
        has = num_pos > dense
        if kept > int(above[:, dense].sum()) + int(has.sum()):
            rows = ((keep.sum(1, dtype=torch.int32) - above[:, dense] > 1) & has).nonzero()[:, 0]
            i = num_pos[rows] - 1 - dense  # the positive's best-first slot
            row_before = torch.arange(g, device=dev)[None, :] < pos_index[rows, i][:, None]
            fix[rows, i] += ((scores[rows] == level[rows]) & row_before).sum(1)
        dense += 1
        keep = scores >= asc[:, dense : dense + 1]
        kept = _count_true(keep)
    flat = _flat_nonzero(keep, kept)
    rows = flat.div(g, rounding_mode="floor")
    values = scores.view(-1)[flat]
    keys = (rows << 32) | _ordered_bits(values)
    pos_keys = ((torch.arange(q, device=dev)[:, None] << 32) | _ordered_bits(asc)).view(-1)  # ascending overall
    below = torch.searchsorted(pos_keys, keys)  # positives strictly below the item: all earlier rows' + its row's
    hist = torch.bincount(below + rows, minlength=q * (p + 1)).view(q, p + 1)  # row·(P+1) + its row's count
    above[:, dense:] = hist.flip(1).cumsum(1).flip(1)[:, 1 + dense :]  # items above more than j positives
    # Items equal to a positive of their row: the positives themselves, and rarely another item (a duplicate image,
    # ±0) or two equal positives. Only then are gallery rows compared.
    tied = pos_keys[below.clamp_max(len(pos_keys) - 1)] == keys
    slots = (num_pos - dense).clamp_min(0)  # the positives gathered here, best first
    valid = torch.arange(1, p, device=dev)[None, :] < num_pos[:, None]
    if int(tied.sum()) > int(slots.sum()) or bool(((asc[:, 1:] == asc[:, :-1]) & valid).any()):
        at = tied.nonzero()[:, 0]
        r = rows[at]
        _add_ties(fix, r, flat[at] - r * g, values[at], pos_scores, pos_index, slots)
    best_first = (num_pos[:, None] - 1 - torch.arange(p, device=dev)[None, :]).clamp_min(0)
    return above.gather(1, best_first) + fix


_NONZERO_SPARSE = 0.03  # below this share numpy's sparse nonzero loop is the faster one


def _count_true(mask: torch.Tensor) -> int:
    """The number of true items (numpy's count is ~5× torch's sum of a bool tensor on the CPU)."""
    return int(np.count_nonzero(mask.numpy())) if mask.device.type == "cpu" else int(mask.sum())


def _flat_nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of a mask's ``count`` true items.

    On the CPU numpy's nonzero is ~2.5× torch's, but for a share of true items up to 10% it takes a branching loop
    that costs up to 3× its branch-free one at 3–10% (mispredictions). A tail of true items past the end (an eighth
    of the mask) puts every share above 10%; its indices come last and are cut off.
    """
    mask = mask.contiguous()
    if mask.device.type != "cpu":
        return mask.view(-1).nonzero()[:, 0]
    n = mask.numel()
    if count <= _NONZERO_SPARSE * n:
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    tail = n // 8 + 1
    padded = torch.ones(n + tail, dtype=torch.bool)
    padded[:n] = mask.view(-1)
    return torch.from_numpy(np.flatnonzero(padded.numpy())[:-tail])


def _same_pid_beats(s_same, same, pos_scores, pos_index) -> torch.Tensor:
    """(Q, P) for each positive, best first: how many of its row's same-pid items (positives and junk, −1 padded)
    rank before it. Each item gets one int64 key, the score's order-preserving bits above the complement of its
    gallery row (a larger key ranks first: a higher score, or an equal one and a smaller row); one sort of each
    row's keys and one binary search per positive: O((P + W) log W) a row, where a broadcast costs P·W."""
    w = same.shape[1]
    k_same = _rank_keys(s_same, same).masked_fill(same < 0, torch.iinfo(torch.int64).min)  # padding ranks last
    ranked = k_same.sort(dim=1).values
    return w - torch.searchsorted(ranked, _rank_keys(pos_scores, pos_index).contiguous(), right=True)


def _rank_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys in ranking order: (order-preserving bits of the score − 2³¹) · 2³² + (2³² − 1 − gallery row)."""
    return ((_ordered_bits(scores) - 2**31) << 32) + (2**32 - 1 - rows.clamp_min(0))


def _add_ties(fix, rows, cols, values, pos_scores, pos_index, slots) -> None:
    """Adds to ``fix`` (Q, P), best first, each item (row, gallery row, score) that equals one of the first
    ``slots[row]`` positives of its row and precedes it in the gallery."""
    p = pos_scores.shape[1]
    step = max(1, (1 << 22) // p)
    first = torch.arange(p, device=fix.device)[None, :]
    for i in range(0, len(rows), step):
        r, c, v = rows[i : i + step], cols[i : i + step], values[i : i + step]
        hit = (pos_scores[r] == v[:, None]) & (pos_index[r] > c[:, None]) & (first < slots[r][:, None])  # (T, P)
        fix.index_add_(0, r, hit.long())


def ranks_from_lists(
    lists: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
    groups: GalleryGroups | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[QueryRanks, torch.Tensor]:
    """Ranks of positives from ranked lists (Q, K) of gallery indices (−1 = empty slot).

    Returns the ranks found and a (Q,) mask of *complete* queries, whose every positive is in its list; the
    others must be completed by :func:`positive_ranks` (counting over the whole gallery).

    ``scores`` (Q, K), the lists' scores, make ties exact: FAISS's heaps put equal scores in descending id order
    and may cut a run of equal scores at a full list's end, keeping higher rows. With the scores each list is
    reordered by (score descending, gallery row ascending), the protocol's rule, and a query with a positive tied
    to its full list's last score is left to counting, since an equal item of a lower row may have been cut.
    """
    if scores is not None:
        lists, scores = _tie_order(lists, scores)
    q = lists.shape[0]
    filled = lists >= 0
    idx = lists.clamp_min(0)
    same_pid = (g_pids[idx] == q_pids[:, None]) & filled
    pos = same_pid & (g_camids[idx] != q_camids[:, None])
    valid = filled & ~(same_pid & ~pos)
    rank_in_valid = valid.long().cumsum(1) - 1  # 0-based rank among valid items
    _, _, num_pos_total, num_valid = (groups or GalleryGroups(g_pids, g_camids)).members(q_pids, q_camids)
    found = pos.sum(1)
    p_max = int(num_pos_total.max()) if q else 0
    ranks = torch.full((q, max(p_max, 1)), -1, dtype=torch.long, device=lists.device)
    slot = pos.long().cumsum(1) - 1
    rows = torch.arange(q, device=lists.device)[:, None].expand_as(pos)
    keep = pos & (slot < ranks.shape[1])
    ranks[rows[keep], slot[keep]] = rank_in_valid[keep]
    complete = found == num_pos_total
    if scores is not None and lists.shape[1] < len(g_pids):
        full = lists[:, -1] >= 0
        complete &= ~(pos & (scores == scores[:, -1:]) & full[:, None]).any(1)
    return QueryRanks(ranks[:, :p_max], num_pos_total, num_valid), complete


def _tie_order(lists: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row by score descending, then gallery row ascending; empty slots (−1) last. Rows already strictly
    descending (no equal scores: the usual case) are returned as they are."""
    scores = scores.float()
    if bool((scores[:, 1:] < scores[:, :-1]).all()):
        return lists, scores
    key = _rank_keys(scores, lists).masked_fill(lists < 0, torch.iinfo(torch.int64).min)  # unique in its row
    order = key.argsort(dim=1, descending=True)
    return lists.gather(1, order), scores.gather(1, order)


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
    labelled = bool(parts) and all(p.rows is not None for p in parts)
    if labelled:
        per_query = {k: np.full(num_queries, np.nan) for k in ("first_hit_rank", "AP", "INP")}
        per_query["positives"] = np.full(num_queries, -1, np.int64)
    for part in parts:
        all_pos = part.num_pos.cpu()  # small tensors: one copy each, then host arithmetic (no GPU launches)
        ok = all_pos > 0
        if labelled:
            rows = part.rows.cpu().numpy()
            per_query["positives"][rows] = all_pos.numpy()
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
        if labelled:
            for key, value in (("first_hit_rank", first + 1), ("AP", ap), ("INP", inp)):
                per_query[key][rows[ok.numpy()]] = value.numpy()
    if labelled and (per_query["positives"] < 0).any():  # the parts' rows add up to Q: a gap means a duplicate
        raise AssertionError("the ranked parts do not cover each query row once")  # a bookkeeping bug, not input
    per_query = per_query if labelled else None
    if n_valid == 0:
        nan = float("nan")
        return MetricResult(nan, nan, [nan] * max_rank, 0, num_queries, nan, approximate, per_query)
    return MetricResult(
        ap_sum / n_valid,
        inp_sum / n_valid,
        (cmc / n_valid).tolist(),
        n_valid,
        num_queries,
        chance_sum / n_valid,
        approximate,
        per_query,
    )
