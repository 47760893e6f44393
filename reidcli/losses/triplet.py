"""Batch-hard triplet loss (Hermans et al. 2017), margin or soft margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pairwise_distance", "hardest_pairs", "batch_hard_triplet"]


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, B) of rows of x (B, D), computed in float32 and clamped before the sqrt.

    Outside autocast: in bf16 the product ``x xᵀ`` would lose the small differences between large squared norms
    that decide the hardest pairs (a ViT step's update differed from fp32's by 9% instead of CE's 0.6%)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        sq = x.pow(2).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(1e-12)
        return d2.sqrt()


def hardest_pairs(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor: its farthest positive (itself excluded) and nearest negative distance, (B,) each;
    −inf / +inf where it has none."""
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    d_ap = dist.masked_fill(~same | self_pair, float("-inf")).amax(1)
    d_an = dist.masked_fill(same, float("inf")).amin(1)
    return d_ap, d_an


def batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Mean over anchors of ``softplus(d_ap − d_an)`` (soft margin, ``margin=None``) or ``relu(d_ap − d_an + m)``.

    Anchors without a positive or a negative in the batch are left out.
    """
    d_ap, d_an = hardest_pairs(pairwise_distance(feats), labels)
    ok = torch.isfinite(d_ap) & torch.isfinite(d_an)
    # a masked mean, not boolean indexing: no data-dependent shape, so no host sync and CUDA-graph safe
    gap = torch.where(ok, d_ap - d_an, 0.0)
    terms = F.softplus(gap) if margin is None else F.relu(gap + margin)
    return torch.where(ok, terms, 0.0).sum() / ok.sum().clamp_min(1)
