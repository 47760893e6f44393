"""Data-parallel set-up from ``torchrun``'s environment (single process when it is absent)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "setup_distributed",
    "teardown_distributed",
    "all_reduce_sum",
    "barrier",
    "replica_summary",
    "summaries_differ",
    "first_differing_replica",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 does all file I/O."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes (NCCL on CUDA, gloo on CPU); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def replica_summary(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n, 3) float64 per tensor: its sum, the sum of its absolute values and the sum of its squares (on the tensors'
    device): what :func:`first_differing_replica` compares across the processes instead of the tensors themselves."""
    rows = []
    for t in tensors:
        v = t.detach().double()
        rows.append(torch.stack([v.sum(), v.abs().sum(), v.square().sum()]))
    return torch.stack(rows)


def summaries_differ(mine: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """(n,) bool: where a :func:`replica_summary` row differs from the reference's by more than ``rtol`` of its scale
    (the sum of absolute values, for the sum; the sum of squares, for itself). Equal tensors summed on equal hardware
    agree exactly; the tolerance leaves room for another summation order (processes on other machines), far below any
    real drift."""
    scale = torch.stack([reference[:, 1], reference[:, 1], reference[:, 2]], dim=1).clamp_min(1e-300)
    return ((mine - reference).abs() > rtol * scale).any(dim=1)


def first_differing_replica(named: dict[str, torch.Tensor], info: DistInfo) -> str | None:
    """The name of the first tensor whose copy on some process differs from rank 0's, or None when every process
    agrees (and always None on one process). One broadcast and one all-reduce of small vectors; every process gets
    the same answer, so all can stop together without one left waiting in a collective."""
    if not info.enabled or not named:
        return None
    mine = replica_summary(list(named.values()))
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differ = summaries_differ(mine, reference).to(torch.int32)
    dist.all_reduce(differ, op=dist.ReduceOp.MAX)
    where = differ.nonzero()
    return list(named)[int(where[0, 0])] if len(where) else None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown_distributed(info: DistInfo) -> None:
    """Leave the process group once every rank is done: left to interpreter exit, gloo's threads can be destroyed
    while still joinable and abort the process (``terminate called without an active exception``)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
