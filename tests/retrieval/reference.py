"""Independent references written from the published definitions (plain numpy loops), for the tests only."""

from __future__ import annotations

import numpy as np


def eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The Market-1501 protocol as torchreid's python evaluator, with a stable sort (ties by gallery order)."""
    rows = per_query_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    valid = ~np.isnan(rows["AP"])
    return (
        rows["cmc"][valid].mean(0),
        float(rows["AP"][valid].mean()),
        float(rows["INP"][valid].mean()),
        int(valid.sum()),
    )


def per_query_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per query (NaN where it has no valid match): "AP", "INP", "first_hit_rank" (1-based), "positives", and its
    0/1 "cmc" row."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    out = {k: np.full(num_q, np.nan) for k in ("AP", "INP", "first_hit_rank")}
    out["positives"] = np.zeros(num_q, np.int64)
    out["cmc"] = np.full((num_q, max_rank), np.nan)
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][~remove]
        out["positives"][q_idx] = raw_cmc.sum()
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.where(raw_cmc == 1)[0]
        out["INP"][q_idx] = cmc[pos_idx.max()] / (pos_idx.max() + 1.0)
        out["first_hit_rank"][q_idx] = pos_idx.min() + 1
        cmc[cmc > 1] = 1
        full = np.zeros(max_rank)
        n = min(max_rank, len(cmc))
        full[:n] = cmc[:n]
        if len(cmc) < max_rank:
            full[n:] = cmc[-1]
        out["cmc"][q_idx] = full
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0)
        out["AP"][q_idx] = (tmp_cmc * raw_cmc).sum() / num_rel
    return out


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking as published (Zhong et al. 2017), on distances given as they are (TransReID's call)."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    ).astype(np.float32)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_recip = forward[np.where(backward == i)[0]]
        expansion = k_recip
        for cand in k_recip:
            half = int(np.around(k1 / 2.0))
            c_forward = initial_rank[cand, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, k_recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(all_num, dtype=np.float32)
        nz = np.where(V[i] != 0)[0]
        for j in nz:
            temp_min[inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:, query_num:]


def market_like(rng, num_ids=30, num_query=40, num_gallery=300, dim=16, cams=6, noise=1.0):
    """Random features with Market-like structure: ids seen by several cameras, distractors (pid 0), queries
    without any cross-camera match."""
    centers = rng.normal(size=(num_ids + 1, dim))
    g_pids = rng.integers(0, num_ids + 1, num_gallery)
    g_camids = rng.integers(0, cams, num_gallery)
    q_pids = rng.integers(1, num_ids + 1, num_query)
    q_camids = rng.integers(0, cams, num_query)
    q_pids[0] = num_ids + 5  # a query with no match at all
    g = centers[np.minimum(g_pids, num_ids)] + noise * rng.normal(size=(num_gallery, dim))
    q = centers[np.minimum(q_pids, num_ids)] + noise * rng.normal(size=(num_query, dim))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return (
        q.astype(np.float32),
        q_pids.astype(np.int64),
        q_camids.astype(np.int64),
        g.astype(np.float32),
        g_pids.astype(np.int64),
        g_camids.astype(np.int64),
    )


def alpha_query_expansion(feats, k=5, alpha=3.0):
    """αQE (Radenović et al. 2018) as fast-reid's AQE applies it: each feature becomes the L2-normalised sum of
    its k most cosine-similar features (itself included), weighted by similarity^α (negative similarities
    weigh 0)."""
    x = feats.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    out = np.empty_like(x)
    for i in range(len(x)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        w = np.maximum(sims[i, order], 0.0) ** alpha
        v = (w[:, None] * x[order]).sum(0)
        out[i] = v / np.linalg.norm(v)
    return out


def tpr_at_fpr(scores, q_pids, g_pids, q_camids, g_camids, fprs):
    """The ROC read at each FPR f, from its definition: over the thresholds t (every pair's score, and −∞), a pair
    accepted when its score > t; the largest TPR whose false positives are at most ⌊f · negatives⌋. Pairs of the
    query's pid and camera are left out (junk)."""
    same = q_pids[:, None] == g_pids[None, :]
    junk = same & (q_camids[:, None] == g_camids[None, :])
    pos, neg = scores[same & ~junk], scores[~same]
    out = []
    for f in fprs:
        allowed = np.floor(f * len(neg))
        best = 0.0
        for t in np.concatenate([np.unique(scores), [-np.inf]]):
            if (neg > t).sum() <= allowed:
                best = max(best, (pos > t).sum() / len(pos))
        out.append(best)
    return out
