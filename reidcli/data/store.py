"""The dataset HDF5 file (``format="reidcli.dataset"``, ``version=1``): write atomically, read with checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from reidcli.errors import FormatError
from reidcli.fileio import atomic_path

__all__ = [
    "DATASET_FORMAT",
    "DatasetSplit",
    "DatasetWriter",
    "write_dataset",
    "read_dataset",
    "read_images",
    "read_rows",
    "open_splits",
    "dataset_summary",
    "dataset_cameras",
    "camera_count",
]

DATASET_FORMAT = "reidcli.dataset"
DATASET_VERSION = 1
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class DatasetSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    pids: np.ndarray  # (N,) int64
    camids: np.ndarray  # (N,) int64, 0-based
    paths: list[str]

    def __len__(self) -> int:
        return len(self.pids)


class DatasetWriter:
    """Writes the splits of a dataset file; used inside :func:`write_dataset`.

    Either :meth:`add_split` (labels known, images filled by the caller), or :meth:`add_images` then
    :meth:`finish_split` for a split written block by block whose final length is known only at its end."""

    def __init__(self, h5: h5py.File, image_size: tuple[int, int]):
        self.h5 = h5
        self.image_size = image_size

    def add_split(self, split: str, pids: np.ndarray, camids: np.ndarray, paths: list[str]) -> h5py.Dataset:
        images = self.add_images(split, len(pids))
        self.finish_split(split, pids, camids, paths)
        return images

    def add_images(self, split: str, capacity: int) -> h5py.Dataset:
        """The split's ``images`` dataset, ``capacity`` rows, shrunk by :meth:`finish_split` to the rows kept."""
        h, w = self.image_size
        n = max(int(capacity), 1)
        return self.h5.create_group(split).create_dataset(
            "images", shape=(capacity, h, w, 3), maxshape=(None, h, w, 3), dtype=np.uint8, chunks=(min(64, n), h, w, 3)
        )

    def finish_split(self, split: str, pids: np.ndarray, camids: np.ndarray, paths: list[str]) -> None:
        g = self.h5[split]
        g.create_dataset("pids", data=np.asarray(pids, dtype=np.int64))
        g.create_dataset("camids", data=np.asarray(camids, dtype=np.int64))
        g.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_STR)
        if g["images"].shape[0] != len(pids):
            g["images"].resize(len(pids), axis=0)


@contextmanager
def write_dataset(path: str | Path, name: str, image_size: tuple[int, int], **attrs) -> Iterator[DatasetWriter]:
    """Create the dataset file atomically: it appears under ``path`` only once the block completes."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = DATASET_FORMAT
        h5.attrs["version"] = DATASET_VERSION
        h5.attrs["name"] = name
        h5.attrs["image_size"] = np.asarray(image_size, dtype=np.int64)
        for k, v in attrs.items():
            h5.attrs[k] = v
        yield DatasetWriter(h5, image_size)


def _open_checked(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"dataset file {path} not found; create it with 'reid prepare'")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path} is not a readable HDF5 file ({e}); recreate it with 'reid prepare'") from e
    fmt, ver = h5.attrs.get("format"), h5.attrs.get("version")
    if fmt != DATASET_FORMAT:
        h5.close()
        raise FormatError(f"{path} is not a reidcli dataset file (format={fmt!r}); create one with 'reid prepare'")
    if ver != DATASET_VERSION:
        h5.close()
        raise FormatError(
            f"{path} has dataset format version {ver}, this reidcli reads {DATASET_VERSION}; re-prepare it"
        )
    return h5


def _check_split(path, split: str, g: h5py.Group, image_size: tuple[int, int]) -> int:
    missing = [k for k in ("images", "pids", "camids", "paths") if k not in g]
    if missing:
        raise FormatError(f"{path}: split '{split}' lacks {', '.join(missing)}; re-prepare the dataset")
    n = g["pids"].shape[0]
    if g["images"].shape != (n, *image_size, 3) or g["camids"].shape != (n,) or g["paths"].shape != (n,):
        raise FormatError(
            f"{path}: split '{split}' has mismatched lengths or image shape "
            f"(images {g['images'].shape}, pids {g['pids'].shape}); re-prepare the dataset"
        )
    return n


def read_dataset(
    path: str | Path,
    splits: tuple[str, ...] = ("train", "query", "gallery"),
    images: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, dict[str, DatasetSplit]]:
    """Attributes and the requested splits, fully in memory (images optional, for metadata-only readers)."""
    with open_splits(path, splits) as (attrs, lazy):
        out = {}
        for split, part in lazy.items():
            n = len(part)
            imgs = np.empty((n, *part.images.shape[1:]), np.uint8) if images else np.empty((0,), np.uint8)
            if images:
                step = 4096
                for i in range(0, n, step):
                    part.images.read_direct(imgs, np.s_[i : i + step], np.s_[i : i + step])
                    if on_progress:
                        on_progress(min(i + step, n), n)
            out[split] = DatasetSplit(imgs, part.pids, part.camids, part.paths)
    return attrs, out


@contextmanager
def open_splits(path: str | Path, splits: tuple[str, ...]) -> Iterator[tuple[dict, dict[str, DatasetSplit]]]:
    """Attributes and the requested splits, each split's ``images`` the file's own dataset, read on slicing while
    the block runs: a pass over the images in batches holds one batch, not the split (MSMT17's query and gallery
    are 9.2 GB at 256×128). Labels and paths are read at once."""
    with _open_checked(path) as h5:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in h5.attrs.items()}
        image_size = tuple(int(x) for x in attrs["image_size"])
        out = {}
        for split in splits:
            if split not in h5:
                raise FormatError(f"{path} has no '{split}' split; re-prepare the dataset")
            g = h5[split]
            _check_split(path, split, g, image_size)
            out[split] = DatasetSplit(
                images=g["images"],
                pids=g["pids"][:].astype(np.int64),
                camids=g["camids"][:].astype(np.int64),
                paths=[p.decode() if isinstance(p, bytes) else p for p in g["paths"][:]],
            )
        yield attrs, out


def read_images(path: str | Path, split: str, rows: np.ndarray) -> np.ndarray:
    """The images at ``rows`` of one split (any order, repeats allowed), without reading the rest: a few pictures
    of Market-1501 at 256×128 need a few MB, not the 1.9 GB of its query and gallery images."""
    rows = np.asarray(rows, dtype=np.int64)
    wanted, back = np.unique(rows, return_inverse=True)
    with _open_checked(path) as h5:
        if split not in h5:
            raise FormatError(f"{path} has no '{split}' split; re-prepare the dataset")
        return read_rows(h5[split]["images"], wanted)[back.reshape(rows.shape)]


def read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for increasing unique ``rows``, read as runs of consecutive rows (one slice each): h5py's
    point selection costs per row, and most row sets here are a few long runs (a split without its distractors)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    if not len(rows):
        return out
    starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # where a run begins, in ``rows``
    ends = np.append(starts[1:], len(rows))
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        dataset.read_direct(out, np.s_[rows[a] : rows[a] + (b - a)], np.s_[a:b])
    return out


def dataset_summary(splits: dict[str, DatasetSplit]) -> list[dict]:
    """Rows of (split, images, ids, cameras) for tables."""
    return [
        {"split": s, "images": len(d), "ids": int(len(np.unique(d.pids))), "cameras": int(len(np.unique(d.camids)))}
        for s, d in splits.items()
    ]


def dataset_cameras(path: str | Path) -> int:
    """The number of camera ids of a dataset file: how many camera embeddings a model with SIE trained on it gets."""
    return camera_count(read_dataset(path, images=False)[1])


def camera_count(splits: dict[str, DatasetSplit]) -> int:
    """1 + the largest 0-based camera id over the splits."""
    return 1 + max(int(p.camids.max()) for p in splits.values() if len(p))
