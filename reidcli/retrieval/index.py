"""FAISS indexes over gallery features: flat (exact inner product) or IVF-PQ (approximate), saved with provenance."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reidcli.errors import ConfigError, FormatError
from reidcli.fileio import atomic_paths, sha256_file

__all__ = [
    "IndexConfig",
    "faiss_gpu_count",
    "build_index",
    "save_index",
    "load_index",
    "check_index_features",
    "search",
    "features_digest",
    "flat_vectors",
    "TopK",
]

log = logging.getLogger(__name__)
GPU_MAX_K = 2048  # FAISS GPU search returns at most this many neighbours


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - install-time choice
        raise ConfigError("FAISS is not installed; run 'make install' (faiss-cpu, or faiss-gpu-cu12 with a GPU)") from e
    return faiss


def faiss_gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "flat"  # "flat" (exact) or "ivfpq" (approximate)
    nlist: int = 0  # IVF cells; 0 = about 4·√N
    m: int = 32  # PQ sub-quantisers (must divide the dimension)
    nbits: int = 8
    nprobe: int = 16
    gpu: bool = True  # use all visible GPUs when FAISS has GPU support

    def validate(self, n: int, d: int) -> IndexConfig:
        if self.kind not in ("flat", "ivfpq"):
            raise ConfigError(f"unknown index kind {self.kind!r}; use 'flat' (exact) or 'ivfpq' (approximate)")
        if self.kind == "ivfpq":
            if self.nlist < 0 or self.m < 1 or self.nprobe < 1:
                raise ConfigError(
                    f"--nlist {self.nlist} --m {self.m} --nprobe {self.nprobe}: --m and --nprobe must be at least 1, "
                    "--nlist at least 0 (0: about 4·√N cells)"
                )
            if d % self.m:
                raise ConfigError(f"--m {self.m} must divide the feature dimension {d}")
            nlist = self.resolved_nlist(n)
            if n < max(nlist, 2**self.nbits):
                raise ConfigError(
                    f"IVF-PQ needs at least {max(nlist, 2**self.nbits)} gallery vectors to train, "
                    f"got {n}; use --kind flat"
                )
        return self

    def sparse_training(self, n: int) -> str | None:
        """A one-line notice when ``n`` vectors are fewer than FAISS advises for training (39 per centroid of the
        coarse quantiser and of each PQ sub-quantiser), else None; FAISS's own warning, printed once per
        sub-quantiser, is silenced in favour of it."""
        if self.kind != "ivfpq":
            return None
        advised = 39 * max(self.resolved_nlist(n), 2**self.nbits)
        if n >= advised:
            return None
        return (
            f"IVF-PQ trained on {n} vectors, fewer than the {advised} FAISS advises (39 per centroid): its ranking "
            "will be coarse; --kind flat is exact and fast at this size"
        )

    def resolved_nlist(self, n: int) -> int:
        return self.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))


def features_digest(feats: np.ndarray, pids: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(pids, dtype=np.int64).tobytes())
    return h.hexdigest()


def build_index(feats: np.ndarray, cfg: IndexConfig):
    """An index whose ids are the rows of ``feats`` (float32, L2-normalised); on GPU when FAISS can."""
    faiss = _faiss()
    x = np.ascontiguousarray(feats, dtype=np.float32)
    n, d = x.shape
    cfg.validate(n, d)
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, cfg.resolved_nlist(n), cfg.m, cfg.nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1  # cfg.sparse_training says it once
        index.train(x)
        index.nprobe = cfg.nprobe
    index.add(x)
    return index


def to_search_device(index, use_gpu: bool = True):
    """The index on all visible GPUs when FAISS has GPU support, else unchanged (with a one-line notice)."""
    faiss = _faiss()
    if use_gpu and faiss_gpu_count() > 0:
        return faiss.index_cpu_to_all_gpus(index), True
    log.info("FAISS has no GPU support here: searching on CPU")
    return index, False


def search(index, queries: np.ndarray, k: int, on_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores (Q, k) and gallery rows (Q, k), best first; −1 rows where the gallery is shorter than k."""
    k = min(k, index.ntotal, GPU_MAX_K if on_gpu else index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def flat_vectors(index) -> np.ndarray | None:
    """The stored vectors (ntotal, d) float32 of an exact flat index, a view valid while the index lives; None
    for any other kind."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexFlat):
        return None
    if hasattr(index, "get_xb"):
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    return index.reconstruct_n(0, index.ntotal)


class TopK:
    """FAISS's k-selection, the heaps its flat search fills, fed with blocks of scores computed elsewhere.

    A flat search is a GEMM followed by this selection; on the CPU the GEMM runs faster through oneDNN (1.9×
    the BLAS in the faiss-cpu wheel on the 2-core test machine) and its blocks also feed the exact counting, so one
    product serves both. Each block holds whole rows (every gallery column), so its rows' lists are final.
    """

    def __init__(self, k: int):
        self.faiss = _faiss()
        self.k = k

    def __call__(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, k) scores and gallery columns, best first; columns of −1 where a row has fewer than k."""
        faiss = self.faiss
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        rows, cols = scores.shape
        values = np.empty((rows, self.k), dtype=np.float32)
        ids = np.empty((rows, self.k), dtype=np.int64)
        heaps = faiss.float_minheap_array_t()  # a min-heap of the k largest scores so far, per row
        heaps.nh, heaps.k = rows, self.k
        heaps.val, heaps.ids = faiss.swig_ptr(values), faiss.swig_ptr(ids)
        heaps.heapify()
        heaps.addn(cols, faiss.swig_ptr(scores), 0, 0, rows)
        heaps.reorder()  # each row best first
        return values, ids


def save_index(index, path: str | Path, meta: dict) -> None:
    """``path`` (.faiss) and ``path`` + ``.json`` (provenance: features file, split, digest, kind), atomically."""
    faiss = _faiss()
    path = Path(path)
    # both renamed together, signals held back between them; the hash still ties the two files together, so even
    # a crash (SIGKILL, power loss) between the renames is detected on loading
    with atomic_paths((path, ".faiss"), (Path(str(path) + ".json"), "")) as (tmp, tmp_meta):
        faiss.write_index(index, str(tmp))
        meta = {"format": "reidcli.index", "version": 1, **meta, "index_sha256": sha256_file(tmp)}
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_index(path: str | Path, feats: np.ndarray | None = None, pids: np.ndarray | None = None):
    """Read an index and its provenance; when features are given, check they are the ones it was built from."""
    faiss = _faiss()
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise FormatError(f"index {path} (with {meta_path.name}) not found; build it with 'reid index'")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("index_sha256") != sha256_file(path):
            raise FormatError(
                f"{path} and {meta_path.name} do not belong together (interrupted write?); "
                "rebuild the index with 'reid index'"
            )
        index = faiss.read_index(str(path))
    except (RuntimeError, ValueError) as e:
        raise FormatError(f"{path} is not a readable FAISS index ({e}); rebuild it with 'reid index'") from e
    if feats is not None:
        check_index_features(path, index, meta, feats, pids)
    return index, meta


def check_index_features(path, index, meta: dict, feats: np.ndarray, pids: np.ndarray | None = None) -> None:
    """That the index at ``path`` (with its ``meta``) was built from these features (and pids)."""
    if index.ntotal != len(feats) or index.d != feats.shape[1]:
        raise FormatError(
            f"index {path} holds {index.ntotal}×{index.d} vectors but the gallery is "
            f"{len(feats)}×{feats.shape[1]}; rebuild it with 'reid index' on these features"
        )
    if pids is not None and meta.get("digest") != features_digest(feats, pids):
        raise FormatError(f"index {path} was built from other features than these; rebuild it with 'reid index'")


def index_meta(cfg: IndexConfig, features_path: str, split: str, feats: np.ndarray, pids: np.ndarray) -> dict:
    return {
        "config": asdict(cfg),
        "features": str(features_path),
        "split": split,
        "ntotal": int(len(feats)),
        "dim": int(feats.shape[1]),
        "digest": features_digest(feats, pids),
        "exact": cfg.kind == "flat",
    }
