"""Evaluation under the Market-1501 protocol: FAISS ranked lists completed by exact counting, or all-torch."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from reidcli.errors import ConfigError, FormatError
from reidcli.retrieval.features import FeatureSplit
from reidcli.retrieval.metrics import (
    COUNTING,
    GalleryGroups,
    MetricResult,
    QueryRanks,
    cpu_block_rows,
    ranks_from_lists,
    ranks_in_blocks,
    scan_available,
    summarize,
)
from reidcli.retrieval.roc import RocCounter, RocResult
from reidcli.retrieval.similarity import MODES, Similarity, choose_mode

__all__ = ["EvalConfig", "EvalOutput", "best_first", "evaluate", "ranked_lists", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 …)")
    return device


@dataclass(frozen=True)
class EvalConfig:
    engine: str = "faiss"  # "faiss": ranked lists from an index + exact counting beyond; "torch": all counting
    depth: int = 100  # length of the FAISS ranked lists
    max_rank: int = 50
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    aqe: bool = False  # α-query expansion of query and gallery features before anything else
    aqe_k: int = 5
    aqe_alpha: float = 3.0
    device: str = "auto"
    memory_mb: int = 0  # working set of one chunk of queries; 0: 1 GiB on CPU, a quarter of free GPU memory
    counting: str = "auto"  # exact counting: "auto", "kernel" (Triton, GPU), "scan" (C, CPU), "sort"/"count" (torch)
    similarity: str = "auto"  # the scores' GEMM: "auto" (tensor cores on a GPU, as accurate as fp32), "fp32", …
    roc: tuple[float, ...] = ()  # false-positive rates at which to report the TPR over all pairs (none: no ROC)

    def validate(self) -> EvalConfig:
        if self.engine not in ("faiss", "torch"):
            raise ConfigError(f"unknown --engine {self.engine!r}; use 'faiss' or 'torch'")
        if self.depth < 1 or self.max_rank < 1:
            raise ConfigError("--depth and --max-rank must be positive")
        if self.k1 < 1 or self.k2 < 1 or not 0.0 <= self.lambda_value <= 1.0:
            raise ConfigError("re-ranking needs k1 ≥ 1, k2 ≥ 1 and 0 ≤ lambda ≤ 1")
        if self.aqe_k < 1 or self.aqe_alpha < 0:
            raise ConfigError(f"--aqe-k {self.aqe_k} --aqe-alpha {self.aqe_alpha}: k must be at least 1, alpha ≥ 0")
        if self.similarity not in MODES:
            raise ConfigError(f"unknown similarity mode {self.similarity!r}; use one of {', '.join(MODES)}")
        if not all(0.0 < f < 1.0 for f in self.roc):
            raise ConfigError(f"--fpr {self.roc}: false-positive rates lie between 0 and 1")
        if self.counting not in COUNTING:
            raise ConfigError(f"unknown counting method {self.counting!r}; use one of {', '.join(COUNTING)}")
        return self


@dataclass(frozen=True)
class EvalOutput:
    metrics: MetricResult
    seconds: float
    engine: str
    device: str
    expanded: tuple[FeatureSplit, FeatureSplit] | None = None  # with --aqe: the query and gallery as evaluated
    roc: RocResult | None = None  # TPR at the asked FPRs (``cfg.roc``), over every pair; timed apart
    roc_seconds: float = 0.0


def _tensors(s: FeatureSplit, dev: torch.device, half: bool = False):
    """Features as float32, or as stored float16 when ``half`` (a GPU's tensor cores multiply them exactly)."""
    dtype = np.float16 if half else np.float32
    return (
        torch.from_numpy(np.ascontiguousarray(s.feats, dtype=dtype)).to(dev),
        torch.from_numpy(s.pids).to(dev),
        torch.from_numpy(s.camids).to(dev),
    )


def _half_on_gpu(query: FeatureSplit, gallery: FeatureSplit, dev: torch.device) -> bool:
    return dev.type == "cuda" and query.feats.dtype == np.float16 and gallery.feats.dtype == np.float16


def _chunk_rows(num_gallery: int, memory_mb: int, dev: torch.device | None = None) -> int:
    """Query rows whose scores (and, on a GPU, the counting's intermediates) fit ``memory_mb``."""
    # per (query, gallery) cell on a GPU: score 4 B, keys 8 B, masks a few B, the sort's twins 16 B; the CPU
    # counts in cache-sized blocks, so only the chunk's scores take memory
    per_cell = 4
    if dev is not None and dev.type == "cuda":
        per_cell = 40
        if memory_mb <= 0:  # few large chunks: one GEMM and one counting launch each
            memory_mb = max(1024, torch.cuda.mem_get_info(dev)[0] // 4 >> 20)
    memory_mb = memory_mb if memory_mb > 0 else 1024
    return max(1, int(memory_mb * 2**20 // (per_cell * max(num_gallery, 1))))


_GEMM_ROWS = 256  # the CPU's fewest query rows per GEMM


def _score_blocks(q, g, chunk: int, cfg: EvalConfig, rows=None):
    """(query rows, scores against the whole gallery) per block of query rows: slices, or ``rows``' pieces."""
    scores = Similarity(g, choose_mode(q, g, cfg.similarity))  # the gallery prepared once for every block
    buffer = None
    if not q.is_cuda:
        # One GEMM per counting block, counted while still in cache (−8% at Market size with the torch counting);
        # at least 256 rows a GEMM, or a large gallery is read from memory once per few rows.
        chunk = min(chunk, max(_GEMM_ROWS, cpu_block_rows(g.shape[0])))
        if scores.takes_out:  # torch.mm's product into one reused buffer
            buffer = torch.empty((chunk, g.shape[0]))
    total = q.shape[0] if rows is None else len(rows)
    for i in range(0, total, chunk):
        sel = slice(i, i + chunk) if rows is None else rows[i : i + chunk]  # slices: views, no gathers
        yield sel, scores(q[sel], None if buffer is None else buffer[: min(chunk, total - i)])


def _count_all(q, qp, qc, g, gp, gc, chunk: int, cfg: EvalConfig, rows=None, groups=None) -> list[QueryRanks]:
    groups = groups or GalleryGroups(gp, gc)
    parts = []
    for sel, block in _score_blocks(q, g, chunk, cfg, rows):
        ids = _ids(sel, len(qp), qp.device)
        parts += _label(ranks_in_blocks(block, qp[sel], qc[sel], gp, gc, groups, method=cfg.counting), ids)
    return parts


def _ids(sel, total: int, device) -> torch.Tensor:
    """The query rows a block selector (a slice or a tensor of rows) stands for."""
    if isinstance(sel, slice):
        return torch.arange(sel.start, min(sel.stop, total), device=device)
    return sel


def _label(parts: list[QueryRanks], ids: torch.Tensor) -> list[QueryRanks]:
    """Consecutive parts labelled with the query rows ``ids`` they cover, in order (for per-query results)."""
    out, start = [], 0
    for part in parts:
        n = len(part.num_pos)
        out.append(part.at(ids[start : start + n]))
        start += n
    return out


def _check(query: FeatureSplit, gallery: FeatureSplit) -> None:
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise FormatError(
            f"query features are {query.feats.shape[1]}-d but gallery features "
            f"{gallery.feats.shape[1]}-d; extract both with the same model"
        )


def evaluate(query: FeatureSplit, gallery: FeatureSplit, cfg: EvalConfig, index=None) -> EvalOutput:
    """Metrics and the seconds spent (file reading excluded). ``index``: a FAISS index over ``gallery``."""
    cfg.validate()
    _check(query, gallery)
    dev = resolve_device(cfg.device)
    if cfg.counting == "kernel" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("the 'kernel' counting method runs on a CUDA GPU; on the CPU use auto, scan, sort or count")
    if cfg.counting == "scan" and (dev.type != "cpu" or not scan_available()):
        raise ConfigError(
            "the 'scan' counting runs on the CPU and its compiled module is not built here; reinstall with a C "
            "compiler present (pip install -e .) or use auto, sort or count"
        )
    expanding = 0.0
    if cfg.aqe:
        if index is not None:
            raise ConfigError(
                "--index holds the gallery features before --aqe expands them; leave out --index (a flat search "
                "runs on the expanded features)"
            )
        from reidcli.retrieval.expansion import expand_splits

        _sync(dev)
        t = time.perf_counter()
        query, gallery = expand_splits(query, gallery, cfg.aqe_k, cfg.aqe_alpha, dev)
        expanding = time.perf_counter() - t
    half = _half_on_gpu(query, gallery, dev) and not cfg.rerank
    q, qp, qc = _tensors(query, dev, half)
    g, gp, gc = _tensors(gallery, dev, half)
    chunk = _chunk_rows(len(gallery), cfg.memory_mb, dev)
    _sync(dev)
    t0 = time.perf_counter() - expanding
    approximate = False
    dist = None
    if cfg.rerank:
        from reidcli.retrieval.rerank import k_reciprocal_rerank

        dist = k_reciprocal_rerank(q, g, cfg.k1, cfg.k2, cfg.lambda_value)
        groups = GalleryGroups(gp, gc)
        parts = [
            part
            for i in range(0, len(qp), chunk)
            for part in _label(
                ranks_in_blocks(
                    dist[i : i + chunk], qp[i : i + chunk], qc[i : i + chunk], gp, gc, groups, True, cfg.counting
                ),
                _ids(slice(i, i + chunk), len(qp), qp.device),
            )
        ]
        engine = "torch+rerank"
    elif cfg.engine == "torch":
        parts = _count_all(q, qp, qc, g, gp, gc, chunk, cfg)
        engine = "torch"
    else:
        parts, approximate = _faiss_ranks(query, gallery, cfg, index, (q, qp, qc, g, gp, gc), chunk)
        engine = "faiss" + ("-approx" if approximate else "")
    if cfg.aqe:
        engine = "aqe+" + engine
    # as torchreid: the CMC is reported up to the gallery's size at most (a longer one only repeats its last value)
    result = summarize(parts, min(cfg.max_rank, max(len(gallery), 1)), approximate)
    _sync(dev)
    if result.num_valid_queries == 0:
        raise FormatError(
            "no query has a matching gallery item from another camera; check that query and gallery "
            "come from the same dataset and that pids/camids are right"
        )
    seconds = time.perf_counter() - t0
    roc, roc_seconds = None, 0.0
    if cfg.roc:
        t = time.perf_counter()
        roc = _roc(q, qp, qc, g, gp, gc, chunk, cfg, dist)
        _sync(dev)
        roc_seconds = time.perf_counter() - t
    expanded = (query, gallery) if cfg.aqe else None
    return EvalOutput(result, seconds, engine, str(dev), expanded, roc, roc_seconds)


def _roc(q, qp, qc, g, gp, gc, chunk: int, cfg: EvalConfig, dist=None) -> RocResult:
    """TPR at ``cfg.roc``'s FPRs over every pair, on the scores the ranking used: the cosine similarity (of the
    expanded features with --aqe), or minus the re-ranked distance."""
    counter = RocCounter(gp, gc, qp, cfg.roc)
    if dist is not None:
        for i in range(0, len(qp), chunk):
            counter.add(-dist[i : i + chunk], qp[i : i + chunk], qc[i : i + chunk], scratch=True)
    else:
        for sel, block in _score_blocks(q, g, chunk, cfg):
            counter.add(block, qp[sel], qc[sel], scratch=True)
    return counter.result()


def _faiss_ranks(query, gallery, cfg, index, tensors, chunk) -> tuple[list[QueryRanks], bool]:
    """Ranks from FAISS lists; queries with positives beyond the list depth are completed by exact counting."""
    from reidcli.retrieval.index import (
        IndexConfig,
        build_index,
        faiss_gpu_count,
        flat_vectors,
        search,
        to_search_device,
    )

    q, qp, qc, g, gp, gc = tensors
    if index is not None and (index.ntotal != len(gp) or index.d != g.shape[1]):
        raise FormatError(
            f"the index holds {index.ntotal} vectors of {index.d} dimensions but the gallery {len(gp)} of "
            f"{g.shape[1]}; rebuild it with 'reid index' from these features"
        )
    groups = GalleryGroups(gp, gc)
    if q.device.type == "cpu" and faiss_gpu_count() == 0:
        vectors = g if index is None else flat_vectors(index)
        if vectors is not None:  # an exact flat index searched on the CPU
            return _flat_search(q, qp, qc, torch.as_tensor(vectors), gp, gc, chunk, cfg, groups), False
    if index is None:
        index = build_index(gallery.feats, IndexConfig(kind="flat"))
    approximate = not _is_flat(index)
    index, on_gpu = to_search_device(index)
    values, lists = search(index, query.feats, cfg.depth, on_gpu)
    found, complete = ranks_from_lists(
        torch.from_numpy(lists).to(q.device), qp, qc, gp, gc, groups, torch.from_numpy(values).to(q.device)
    )
    parts = _select_rows([found.at(torch.arange(len(qp), device=qp.device))], complete)
    tail = complete.logical_not().nonzero()[:, 0]
    if len(tail):
        parts += _count_all(q, qp, qc, g, gp, gc, chunk, cfg, rows=tail, groups=groups)
    return parts, approximate


def _flat_search(q, qp, qc, g, gp, gc, chunk: int, cfg: EvalConfig, groups: GalleryGroups) -> list[QueryRanks]:
    """A flat index's exact search done as FAISS does it, a GEMM then FAISS's k-selection heaps, with the GEMM in
    oneDNN blocks (1.9× the faiss-cpu wheel's BLAS on the 2-core test machine); each block of scores also counts the
    ranks of its queries whose positives are not all in their lists, so one product serves both (FAISS's own
    search followed by counting had cost two at Market and MSMT17 sizes: 0.52–0.71 s and 10.7 s, against 0.25 s
    and 5.1 s for the counting alone). When most of a block's queries need counting (MSMT17-like features: 76% have
    a positive beyond 100), the whole block is counted in place instead of copying those rows out."""
    from reidcli.retrieval.index import TopK

    top_k = TopK(min(cfg.depth, g.shape[0]))
    parts = []
    for sel, block in _score_blocks(q, g, chunk, cfg):
        values, lists = top_k(block.numpy())
        qp_b, qc_b, ids = qp[sel], qc[sel], _ids(sel, len(qp), qp.device)
        found, complete = ranks_from_lists(
            torch.from_numpy(lists), qp_b, qc_b, gp, gc, groups, torch.from_numpy(values)
        )
        parts += _select_rows([found.at(ids)], complete)
        tail = complete.logical_not()
        num_tail = int(tail.sum())
        if 4 * num_tail > len(tail):  # many: count the block in place rather than copy most of its rows
            counted = ranks_in_blocks(block, qp_b, qc_b, gp, gc, groups, method=cfg.counting)
            parts += _select_rows(_label(counted, ids), tail)
        elif num_tail:
            rows = tail.nonzero()[:, 0]
            counted = ranks_in_blocks(block[rows], qp_b[rows], qc_b[rows], gp, gc, groups, method=cfg.counting)
            parts += _label(counted, ids[rows])
    return parts


def _select_rows(parts: list[QueryRanks], mask: torch.Tensor) -> list[QueryRanks]:
    """The rows of consecutive parts where ``mask`` (over all their rows) is true."""
    out, start = [], 0
    for part in parts:
        m = mask[start : start + len(part.num_pos)]
        start += len(part.num_pos)
        out.append(part.take(m))
    return out


def _is_flat(index) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ranked_lists(query: FeatureSplit, gallery: FeatureSplit, k: int, device: str = "auto") -> np.ndarray:
    """Top-k gallery rows per query (Q, k) by cosine similarity, equal scores in gallery order as the evaluation
    ranks them; for pictures of a few queries (a stable sort of each row). Junk is marked by the caller."""
    dev = resolve_device(device)
    half = _half_on_gpu(query, gallery, dev)
    q, _, _ = _tensors(query, dev, half)
    g, _, _ = _tensors(gallery, dev, half)
    scores = Similarity(g, choose_mode(q, g))
    k = min(k, len(gallery))
    return torch.cat([best_first(scores(q[i : i + 1024]), k) for i in range(0, len(q), 1024)]).cpu().numpy()


def best_first(scores: torch.Tensor, k: int, descending: bool = True) -> torch.Tensor:
    """The first ``k`` columns of each row in score order, ties in column order (``topk`` does not keep it)."""
    return torch.sort(scores, dim=1, descending=descending, stable=True).indices[:, :k]
