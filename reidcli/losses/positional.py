"""Patch-level losses: the patch triplet and the seed's relative-position (RP) triplet.

RP triplet: per image, rank patch tokens by similarity to the CLS token, keep the top N in rank order, and take
the positional relation ``r(a, b)`` of every pair (a, b) of them (C(N,2) values); a triplet loss then asks
images of one identity for similar relation vectors. The relation depends on the image only through *which*
patches were picked; its gradient reaches only the position parameters.

Why the raw form diverges: the loss can always be lowered by scaling the position parameters, because
``‖r_a − r_n‖`` grows without bound with their norm while the soft-margin term keeps rewarding a larger gap.
The stabilised form L2-normalises the relation vectors (scale-invariant, so the gap is bounded by 2) and uses the
soft margin; a weight warm-up (in the trainer) keeps it from dominating the first epochs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from reidcli.losses.triplet import batch_hard_triplet

__all__ = ["top_patches", "patch_embedding", "relation_vectors", "rp_triplet"]


def top_patches(cls_feat: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of the patch tokens most cosine-similar to the CLS token, most similar first (in float32, also
    under autocast)."""
    with torch.autocast(tokens.device.type, enabled=False):
        sim = torch.einsum("bd,bnd->bn", F.normalize(cls_feat.float(), dim=-1), F.normalize(tokens.float(), dim=-1))
    return sim.topk(min(n, tokens.shape[1]), dim=1).indices


def patch_embedding(cls_feat: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, D): the mean of the top-n CLS-similar patch tokens."""
    idx = top_patches(cls_feat, tokens, n)
    return torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1])).mean(1)


def relation_vectors(model, cls_feat: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C(n,2)): positional relations of all pairs (i < j) of the top-n patches, in rank order."""
    idx = top_patches(cls_feat.detach(), tokens.detach(), n)  # (B, n)
    i, j = torch.triu_indices(idx.shape[1], idx.shape[1], offset=1, device=idx.device)
    return model.positional_relation(idx[:, i], idx[:, j])


def rp_triplet(
    relations: torch.Tensor, labels: torch.Tensor, form: Literal["raw", "stable"] = "stable"
) -> torch.Tensor:
    """Batch-hard triplet on relation vectors: ``raw`` as in the seed (unbounded vectors, soft margin),
    ``stable`` on L2-normalised vectors with a soft margin."""
    if form == "raw":
        return batch_hard_triplet(relations, labels, margin=None)
    return batch_hard_triplet(F.normalize(relations, dim=1), labels, margin=None)
