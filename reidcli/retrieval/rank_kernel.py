"""Exact positive ranks in one Triton kernel: the GPU's counting, with no sort, gather or host sync per chunk.

One program per query row. It reads the row's same-pid gallery items (positives and junk: a span of the gallery
sorted by pid, :class:`~reidcli.retrieval.metrics.GalleryGroups`), then streams the row's scores once, in blocks
of 2,048: a block whose best score is below the weakest positive is skipped after one max; in the others, each
tile of a few dozen items is tested the same way (from cache), and only tiles holding a candidate compare every
item with every positive (higher score, or an equal score and a smaller gallery row: the stable tie-break). A
trained model has a few dozen candidates per row, so the work is about one read of the scores. Junk (same pid,
same camera) is dropped from the candidate tiles by their gallery pids and cameras.
The result is the 0-based rank of each positive among the valid items, identical to
:func:`~reidcli.retrieval.metrics.positive_ranks`'s torch methods.

Only the launch sizes depend on the data (the widest same-pid group, rounded up to a power of two), so a whole
Market-size evaluation is the similarity GEMM, one sort of the gallery's pids, two binary searches and this kernel. With
``TRITON_INTERPRET=1`` set before Triton is imported, the same kernel runs on CPU tensors (the tests do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_SAME", "kernel_ranks", "launch_sizes"]

MAX_SAME = 512  # widest same-pid group (padded) the kernel takes (1,024 spills registers); wider: the torch methods


@triton.jit
def _rank_rows(
    scores_ptr,
    stride_s,
    order_ptr,
    lo_ptr,
    count_ptr,
    g_pid_ptr,
    g_cam_ptr,
    q_pid_ptr,
    q_cam_ptr,
    ranks_ptr,
    stride_ranks,
    num_pos_ptr,
    num_valid_ptr,
    num_gallery,
    SAME: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.arange(0, SAME)
    lo = tl.load(lo_ptr + row)
    same = tl.load(order_ptr + lo + j, mask=j < tl.load(count_ptr + row), other=-1).to(tl.int32)  # gallery rows
    has = same >= 0
    safe = tl.where(has, same, 0)
    q_pid = tl.load(q_pid_ptr + row)
    q_cam = tl.load(q_cam_ptr + row)
    cam = tl.load(g_cam_ptr + safe, mask=has, other=0)
    is_pos = has & (cam != q_cam)
    is_junk = has & (cam == q_cam)
    row_ptr = scores_ptr + row.to(tl.int64) * stride_s
    s_same = tl.load(row_ptr + safe, mask=has, other=float("-inf"))
    pos = tl.where(is_pos, s_same, float("inf"))  # pads: nothing beats +inf
    weakest = tl.min(pos, axis=0)
    beats = tl.zeros([SAME], dtype=tl.int32)
    for start in range(0, num_gallery, SCAN):
        offs = start + tl.arange(0, SCAN)
        block = tl.load(row_ptr + offs, mask=offs < num_gallery, other=float("-inf"))
        if tl.max(block, axis=0) >= weakest:  # blocks of a good model mostly stop here or at the next test
            for sub in range(0, SCAN, BLOCK):
                o = start + sub + tl.arange(0, BLOCK)
                v = tl.load(row_ptr + o, mask=o < num_gallery, other=float("-inf"))  # cached: just read
                if tl.max(v, axis=0) >= weakest:  # a candidate: junk (same pid and camera) never counts
                    g_pid = tl.load(g_pid_ptr + o, mask=o < num_gallery, other=0)
                    g_cam = tl.load(g_cam_ptr + o, mask=o < num_gallery, other=0)
                    v = tl.where((g_pid == q_pid) & (g_cam == q_cam), float("-inf"), v)
                    wins = (v[:, None] > pos[None, :]) | ((v[:, None] == pos[None, :]) & (o[:, None] < same[None, :]))
                    beats += tl.sum(wins.to(tl.int32), axis=0)
    ranks = tl.sort(tl.where(is_pos, beats, 2147483647))  # a query's positives in rank order, pads last
    out = tl.where(ranks == 2147483647, -1, ranks).to(tl.int64)
    tl.store(ranks_ptr + row.to(tl.int64) * stride_ranks + j, out)
    tl.store(num_pos_ptr + row, tl.sum(is_pos.to(tl.int64), axis=0))
    tl.store(num_valid_ptr + row, num_gallery - tl.sum(is_junk.to(tl.int64), axis=0))


def launch_sizes(width: int) -> dict[str, int]:
    """The kernel's compile-time sizes for same-pid groups padded to ``width``. A (block × width) comparison tile
    of 1,024 elements keeps a program at ≤ 90 registers (ptxas, sm_90a), so several programs share an SM and keep
    tens of KB of score loads in flight: enough to stream at memory speed."""
    return {"SAME": width, "SCAN": 2048, "BLOCK": max(4, 1024 // width)}


def kernel_ranks(
    scores: torch.Tensor,
    order: torch.Tensor,
    lo: torch.Tensor,
    counts: torch.Tensor,
    width: int,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_pids: torch.Tensor,
    g_camids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranks (Q, W) ascending, −1 padded; positives (Q,); valid items (Q,)), int64, for ``scores`` (Q, G).

    A query's same-pid gallery rows are ``order[lo : lo + counts]`` (:class:`~reidcli.retrieval.metrics.GalleryGroups`
    spans), at most ``width`` ≤ :data:`MAX_SAME` of them."""
    q, g = scores.shape
    w = max(16, 1 << max(width - 1, 0).bit_length())
    if w > MAX_SAME:
        raise ValueError(f"same-pid groups of {width} gallery items are wider than the kernel's {MAX_SAME}")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    dev = scores.device
    ranks = torch.empty((q, w), dtype=torch.long, device=dev)
    num_pos = torch.empty(q, dtype=torch.long, device=dev)
    num_valid = torch.empty(q, dtype=torch.long, device=dev)
    if q:
        _rank_rows[(q,)](
            scores,
            scores.stride(0),
            order.contiguous(),
            lo.contiguous(),
            counts.contiguous(),
            g_pids.contiguous(),
            g_camids.contiguous(),
            q_pids.contiguous(),
            q_camids.contiguous(),
            ranks,
            ranks.stride(0),
            num_pos,
            num_valid,
            g,
            **launch_sizes(w),
        )
    return ranks, num_pos, num_valid
