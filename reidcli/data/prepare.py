"""``reid prepare``: parse a dataset layout, decode and resize every image once, write the dataset HDF5."""

from __future__ import annotations

import io
import itertools
import logging
import os
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from reidcli.data.layouts import DATASETS, SPLITS, Record, is_image, parse_layout
from reidcli.data.naming import parse_market_name
from reidcli.data.sources import Source, open_source
from reidcli.data.store import DatasetWriter, write_dataset
from reidcli.errors import ConfigError, DataError

__all__ = ["PrepareConfig", "PrepareResult", "prepare_dataset", "decode_image", "RESIZE_FILTERS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str
    root: Path
    out: Path
    image_size: tuple[int, int] = (256, 128)
    skip_bad: bool = False  # skip unreadable images (counted and reported) instead of stopping
    cuhk03_subset: str = "detected"
    resize: str = "bicubic"  # PIL's filter to the stored size: bicubic (fast-reid), bilinear (TransReID, torchreid)
    extra_gallery: Path | None = None  # more gallery images (Market-1501 naming), e.g. Market-1501's 500k distractors
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        h, w = self.image_size
        if h < 16 or w < 16:
            raise ConfigError(f"--image-size {h}x{w} is too small; use at least 16x16 (default 256x128)")
        if self.resize not in RESIZE_FILTERS:
            raise ConfigError(f"unknown --resize {self.resize!r}; choose one of {', '.join(RESIZE_FILTERS)}")
        if self.cuhk03_subset not in ("detected", "labeled"):
            raise ConfigError("--cuhk03-subset must be 'detected' or 'labeled'")


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    rows: list[dict]  # per split: images, ids, cameras
    skipped: list[str]  # unreadable images left out (only with skip_bad)


SKIP_BAD = "restore it, or pass --skip-bad to leave it out"


RESIZE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_image(
    data: bytes, size: tuple[int, int], name: str, fix: str = SKIP_BAD, resize: str = "bicubic"
) -> np.ndarray:
    """Any PIL-readable image (JPEG, PNG, grayscale, CMYK…) → RGB uint8 ``(H, W, 3)``, resized by PIL's ``resize``
    filter (what torchvision's ``Resize`` does to a PIL image). ``fix``: what the error message tells the user to do
    about an unreadable image."""
    if not data:
        raise DataError(f"image {name} is empty (0 bytes); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), RESIZE_FILTERS[resize])
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError as e:  # PIL's own text names an in-memory buffer, not the file
        raise DataError(f"image {name} cannot be decoded (not in an image format PIL reads); {fix}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {name} cannot be decoded ({e}); {fix}") from e


BLOCK = 256  # images decoded, then written, at a time: memory stays bounded whatever the split's size


def _in_order(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
    """``fn`` over ``items`` on ``pool``, results in order, at most ``window`` in flight (unlike ``pool.map``, which
    submits everything at once and would hold every finished image until its turn)."""
    pending: deque = deque()
    it = iter(items)
    try:
        for item in itertools.islice(it, window):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        for f in pending:
            f.cancel()


def _write_split(
    writer: DatasetWriter,
    split: str,
    items: list[tuple[Source, Record, str]],
    cfg: PrepareConfig,
    pool: ThreadPoolExecutor,
    on_image: Callable[[], None] | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``items`` (source, record, stored path) block by block straight into the split; return the pids and
    cameras kept and the paths skipped."""

    def load(item: tuple[Source, Record, str]) -> np.ndarray | None:
        source, rec, _ = item
        try:
            return decode_image(source.read(rec.path), cfg.image_size, rec.path, resize=cfg.resize)
        except DataError:
            if not cfg.skip_bad:
                raise
            return None
        finally:
            if on_image:
                on_image()

    images = writer.add_images(split, len(items))
    block = np.empty((BLOCK, *cfg.image_size, 3), np.uint8)
    kept: list[tuple[Source, Record, str]] = []
    skipped: list[str] = []
    filled = 0
    for item, array in zip(items, _in_order(pool, load, items, 2 * BLOCK), strict=True):
        if array is None:
            skipped.append(item[1].path)
            continue
        block[len(kept) - filled] = array
        kept.append(item)
        if len(kept) - filled == BLOCK:
            images[filled : len(kept)] = block
            filled = len(kept)
    if not kept:
        raise DataError(f"no readable image left in the {split} split of {items[0][0].label}; check the dataset")
    if len(kept) > filled:
        images[filled : len(kept)] = block[: len(kept) - filled]
    pids = np.array([r.pid for _, r, _ in kept], dtype=np.int64)
    camids = np.array([r.camid for _, r, _ in kept], dtype=np.int64)
    writer.finish_split(split, pids, camids, [stored for _, _, stored in kept])
    return pids, camids, skipped


def _extra_gallery(path: Path, gallery: list[Record]) -> tuple[Source, list[Record], str]:
    """The extra gallery's images (Market-1501 naming, junk left out), and the prefix of their stored paths: the
    folder's name (a zip's name without ``.zip``, unless its members are already in that folder), so that they read
    as ``images/0000_c1s1_….jpg``."""
    if not path.exists() or (path.is_file() and not zipfile.is_zipfile(path)):
        raise DataError(
            f"--extra-gallery {path} is neither a folder nor a zip archive; "
            "pass the folder (or zip) of the extra images"
        )
    source = open_source(path)
    records = []
    for f in source.files():
        if not is_image(f):
            continue
        pid, cam = parse_market_name(PurePosixPath(f).name)
        if pid != -1:
            records.append(Record(f, pid, cam))
    if not records:
        raise DataError(f"--extra-gallery {path} holds no image with a pid (Market-1501 naming); check the folder")
    prefix = (path.stem if path.is_file() else path.resolve().name) + "/"
    if all(r.path.startswith(prefix) for r in records):  # a zip holding its folder: images/…, not images/images/…
        prefix = ""
    taken = {r.path for r in gallery}
    twice = next((prefix + r.path for r in records if prefix + r.path in taken), None)
    if twice:
        raise DataError(f"--extra-gallery {path}: {twice} is already in the dataset's gallery; pass only extra images")
    return source, records, prefix


def prepare_dataset(cfg: PrepareConfig, on_progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Validate the whole layout first (names, splits), then decode and write; the output appears atomically."""
    cfg.validate()
    source = open_source(cfg.root)
    splits = parse_layout(cfg.dataset, source, cfg.cuhk03_subset)
    items = {split: [(source, r, r.path) for r in records] for split, records in splits.items()}
    attrs = {"source": str(cfg.root), "resize": cfg.resize}
    if cfg.extra_gallery is not None:
        extra, records, prefix = _extra_gallery(cfg.extra_gallery, splits["gallery"])
        items["gallery"] += [(extra, r, prefix + r.path) for r in records]
        attrs["extra_gallery"] = str(cfg.extra_gallery)
    total = sum(len(r) for r in items.values())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress and (done % 64 == 0 or done == total):
            on_progress(done, total)

    rows, skipped = [], []
    with (
        ThreadPoolExecutor(cfg.workers) as pool,
        write_dataset(cfg.out, cfg.dataset, cfg.image_size, **attrs) as writer,
    ):
        for split in SPLITS:
            pids, camids, bad = _write_split(writer, split, items[split], cfg, pool, tick)
            skipped += bad
            rows.append(
                {
                    "split": split,
                    "images": len(pids),
                    "ids": int(len(np.unique(pids))),
                    "cameras": int(len(np.unique(camids))),
                }
            )
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    return PrepareResult(out=cfg.out, rows=rows, skipped=skipped)
