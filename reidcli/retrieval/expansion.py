"""α-query expansion (αQE, Radenović et al. 2018; fast-reid's ``TEST.AQE``): every query and gallery feature is
replaced by the L2-normalised, similarity-weighted sum of its ``k`` most similar features (itself included) from
the joint query + gallery set, the weights being ``max(sim, 0)^α``. Evaluation then runs on the expanded features
under the same protocol (and re-ranking, when asked for, on them too).

Rows go in blocks whose similarity row-block stays within a memory budget, so MSMT17's 93,820 joint rows need no
N × N matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from reidcli.retrieval.features import FeatureSplit
from reidcli.retrieval.similarity import Similarity, choose_mode

__all__ = ["alpha_query_expansion", "expand_splits"]


@torch.no_grad()
def alpha_query_expansion(x: torch.Tensor, k: int, alpha: float, budget: int | None = None) -> torch.Tensor:
    """(N, D) features → (N, D) expanded, L2-normalised float32 features (on ``x``'s device)."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    k = min(k, n)
    budget = budget or (1 << 26 if x.is_cuda else 1 << 23)  # similarity values per block
    out = torch.empty_like(x)
    step = max(1, budget // max(n, 1))
    scores = Similarity(x, choose_mode(x, x))  # oneDNN on the CPU, tensor cores at fp32 accuracy on a GPU
    for i in range(0, n, step):
        sim = scores(x[i : i + step])
        w, idx = sim.topk(k, dim=1)
        w = w.clamp_min_(0).pow_(alpha)
        out[i : i + step] = torch.einsum("rk,rkd->rd", w, x[idx])
    return F.normalize(out, dim=1)


def expand_splits(
    query: FeatureSplit, gallery: FeatureSplit, k: int, alpha: float, device: torch.device
) -> tuple[FeatureSplit, FeatureSplit]:
    """The two splits with expanded float32 features (labels and paths unchanged)."""
    x = torch.cat([torch.from_numpy(np.asarray(s.feats, dtype=np.float32)) for s in (query, gallery)]).to(device)
    y = alpha_query_expansion(x, k, alpha).cpu().numpy()
    nq = len(query)
    return dataclasses.replace(query, feats=y[:nq]), dataclasses.replace(gallery, feats=y[nq:])
