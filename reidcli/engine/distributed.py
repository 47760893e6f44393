"""Data-parallel set-up from ``torchrun``'s environment (single process when it is absent)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "all_reduce_sum", "barrier"]


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


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown_distributed(info: DistInfo) -> None:
    """Leave the process group once every rank is done: left to interpreter exit, gloo's threads can be destroyed
    while still joinable and abort the process (``terminate called without an active exception``)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
