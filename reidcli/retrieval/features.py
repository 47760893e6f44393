"""The features HDF5 file (``format="reidcli.features"``, ``version=1``), whoever wrote it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from reidcli.errors import FormatError
from reidcli.fileio import atomic_path

__all__ = ["FEATURES_FORMAT", "FeatureSplit", "write_features", "read_features", "renormalised_notice"]

FEATURES_FORMAT = "reidcli.features"
FEATURES_VERSION = 1
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class FeatureSplit:
    feats: np.ndarray  # (N, D) float16/float32, L2-normalised
    pids: np.ndarray  # (N,) int64
    camids: np.ndarray  # (N,) int64
    paths: list[str] = field(default_factory=list)
    renormalised: int = 0  # rows the reader scaled to unit length (a file whose writer did not normalise them)
    norm_range: tuple[float, float] = (1.0, 1.0)  # the smallest and largest row norm as stored

    def __len__(self) -> int:
        return len(self.pids)


def write_features(path: str | Path, splits: dict[str, FeatureSplit], provenance: dict | None = None) -> None:
    """Write atomically; provenance values that are not strings or numbers are stored as JSON."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = FEATURES_FORMAT
        h5.attrs["version"] = FEATURES_VERSION
        for k, v in (provenance or {}).items():
            v = v.item() if isinstance(v, np.generic) else v  # e.g. attributes read back from another file
            h5.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
        for name, s in splits.items():
            g = h5.create_group(name)
            g.create_dataset("feats", data=s.feats)
            g.create_dataset("pids", data=np.asarray(s.pids, dtype=np.int64))
            g.create_dataset("camids", data=np.asarray(s.camids, dtype=np.int64))
            paths = s.paths if s.paths else [""] * len(s.pids)
            g.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_STR)


def read_features(
    path: str | Path, splits: tuple[str, ...] = ("query", "gallery")
) -> tuple[dict, dict[str, FeatureSplit]]:
    """Attributes and splits, checked: format/version, groups, lengths, dimensions, finite values; rows that are
    not unit length are L2-normalised (counted in ``FeatureSplit.renormalised``; see :func:`renormalised_notice`)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"features file {path} not found; create it with 'reid extract'")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path} is not a readable HDF5 file ({e}); recreate it with 'reid extract'") from e
    with h5:
        fmt, ver = h5.attrs.get("format"), h5.attrs.get("version")
        if fmt != FEATURES_FORMAT:
            raise FormatError(f"{path} is not a reidcli features file (format={fmt!r}); write one with 'reid extract'")
        if ver != FEATURES_VERSION:
            raise FormatError(f"{path} has features format version {ver}; this reidcli reads {FEATURES_VERSION}")
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in h5.attrs.items()}
        out = {name: _read_split(path, h5, name) for name in splits}
    dims = {name: s.feats.shape[1] for name, s in out.items()}
    if len(set(dims.values())) > 1:
        raise FormatError(f"{path}: feature dimensions differ between splits {dims}; extract all splits together")
    return attrs, out


def _read_split(path: Path, h5: h5py.File, name: str) -> FeatureSplit:
    if name not in h5:
        raise FormatError(f"{path} has no '{name}' group; extract it with 'reid extract --splits query,gallery'")
    g = h5[name]
    missing = [k for k in ("feats", "pids", "camids") if k not in g]
    if missing:
        raise FormatError(f"{path}: group '{name}' lacks {', '.join(missing)}; re-extract the features")
    feats = g["feats"][:]
    if feats.ndim != 2 or feats.dtype not in (np.float16, np.float32):
        raise FormatError(f"{path}: {name}/feats must be float16 or float32 [N, D], got {feats.dtype} {feats.shape}")
    n = feats.shape[0]
    pids, camids = g["pids"][:], g["camids"][:]
    paths = [p.decode() if isinstance(p, bytes) else p for p in g["paths"][:]] if "paths" in g else []
    if pids.shape != (n,) or camids.shape != (n,) or (paths and len(paths) != n):
        raise FormatError(
            f"{path}: {name} has {n} features but {pids.shape[0]} pids / {camids.shape[0]} camids; re-extract"
        )
    if n == 0:
        raise FormatError(f"{path}: the '{name}' group is empty; extract a non-empty split")
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats).all(1)).sum())
        raise FormatError(f"{path}: {bad} {name} feature row(s) hold NaN or Inf; re-extract with a healthy model")
    feats, scaled, norm_range = _unit_rows(feats, path, name)
    return FeatureSplit(feats, pids.astype(np.int64), camids.astype(np.int64), paths, scaled, norm_range)


# float16 storage rounds a unit row's norm by up to ~5e-4; a row further from 1 was not normalised by its writer
_UNIT_TOLERANCE = 2e-3


def _unit_rows(feats: np.ndarray, path: Path, name: str) -> tuple[np.ndarray, int, tuple[float, float]]:
    """The rows L2-normalised when any is not unit length (the format stores them normalised and defines the
    similarity as cosine; a file from a writer that did not normalise would otherwise be ranked by inner product),
    with how many rows were off and the stored norms' range; all-zero rows are refused (no cosine for them)."""
    import torch

    rows = torch.from_numpy(feats)
    norms = torch.cat(  # float32 sums a block at a time: bounded memory for float16 files
        [torch.linalg.vector_norm(b, dim=1, dtype=torch.float32) for b in rows.split(65536)]
    ).numpy()
    zero = int((norms == 0).sum())
    if zero:
        raise FormatError(
            f"{path}: {zero} {name} feature row(s) are all zero, which no cosine similarity can rank; re-extract "
            "them with a healthy model"
        )
    off = int((np.abs(norms - 1) > _UNIT_TOLERANCE).sum())
    norm_range = (float(norms.min()), float(norms.max()))
    if not off:
        return feats, 0, norm_range
    return feats.astype(np.float32) / norms[:, None], off, norm_range


def renormalised_notice(path: str | Path | None, splits: dict[str, FeatureSplit]) -> str | None:
    """One line when the reader normalised rows of ``path`` (None when every row was unit length already); without
    ``path``, the sentence alone (no ``notice: PATH:`` before it)."""
    scaled = {name: s for name, s in splits.items() if s.renormalised}
    if not scaled:
        return None
    counts = " and ".join(f"{s.renormalised:,} of {len(s):,} {name}" for name, s in scaled.items())
    lo = min(s.norm_range[0] for s in scaled.values())
    hi = max(s.norm_range[1] for s in scaled.values())
    text = (
        f"{counts} feature rows are not unit length (norms {lo:.3g}–{hi:.3g}); they are used L2-normalised (cosine "
        "similarity, as the features format defines)"
    )
    return text if path is None else f"notice: {path}: {text}"
