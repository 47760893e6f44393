"""PK batches: P identities × K images each, drawn on a seeded generator (vectorised, no per-image Python)."""

from __future__ import annotations

import numpy as np
import torch

from reidcli.errors import ConfigError

__all__ = ["PKSampler"]


class PKSampler:
    """Batches of ``p·k`` indices: P distinct identities, K images each (with replacement for ids with < K).

    One epoch has ``len(labels) // (p·k)`` batches (about one pass over the images). ``rank``/``world`` split each
    batch's identities for data-parallel training so that every process sees whole identities.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.p, self.k, self.rank, self.world = p, k, rank, world
        ids, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        if p > len(ids):
            raise ConfigError(f"batch asks for {p} identities but the training split has {len(ids)}; lower --batch")
        if k > counts.max():
            raise ConfigError(f"--k {k} images per identity but no identity has more than {counts.max()}; lower --k")
        if p % world:
            raise ConfigError(f"{p} identities per batch do not split over {world} processes; adjust --batch")
        order = np.argsort(inverse, kind="stable")
        self.starts = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.counts = torch.as_tensor(counts)
        self.members = torch.as_tensor(order)  # image indices grouped by identity
        self.num_batches = max(1, len(self.labels) // (p * k))

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, gen: torch.Generator) -> torch.Tensor:
        """(num_batches, p·k / world) image indices for this process, identity-major within each batch."""
        n_ids = len(self.counts)
        ids = torch.stack([torch.randperm(n_ids, generator=gen)[: self.p] for _ in range(self.num_batches)])
        counts = self.counts[ids]  # (nb, p)
        # K distinct images where an id has ≥ K (random ranks of a random permutation), else with replacement.
        keys = torch.rand(self.num_batches, self.p, int(self.counts.max()), generator=gen)
        keys = keys.masked_fill(torch.arange(keys.shape[-1]) >= counts[..., None], 2.0)
        distinct = keys.argsort(-1)[..., : self.k]  # (nb, p, k)
        repl = (torch.rand(self.num_batches, self.p, self.k, generator=gen) * counts[..., None]).long()
        offsets = torch.where((counts >= self.k)[..., None], distinct, repl)
        picks = self.members[self.starts[ids][..., None] + offsets]  # (nb, p, k)
        per_rank = self.p // self.world
        return picks[:, self.rank * per_rank : (self.rank + 1) * per_rank].reshape(self.num_batches, -1)
