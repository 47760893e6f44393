"""``reid prepare``: parse a dataset layout, decode and resize every image once, write the dataset HDF5."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reidcli.data.layouts import DATASETS, SPLITS, Record, parse_layout
from reidcli.data.sources import Source, open_source
from reidcli.data.store import write_dataset
from reidcli.errors import ConfigError, DataError

__all__ = ["PrepareConfig", "PrepareResult", "prepare_dataset", "decode_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str
    root: Path
    out: Path
    image_size: tuple[int, int] = (256, 128)
    skip_bad: bool = False  # skip unreadable images (counted and reported) instead of stopping
    cuhk03_subset: str = "detected"
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        h, w = self.image_size
        if h < 16 or w < 16:
            raise ConfigError(f"--image-size {h}x{w} is too small; use at least 16x16 (default 256x128)")
        if self.cuhk03_subset not in ("detected", "labeled"):
            raise ConfigError("--cuhk03-subset must be 'detected' or 'labeled'")


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    rows: list[dict]  # per split: images, ids, cameras
    skipped: list[str]  # unreadable images left out (only with skip_bad)


SKIP_BAD = "restore it, or pass --skip-bad to leave it out"


def decode_image(data: bytes, size: tuple[int, int], name: str, fix: str = SKIP_BAD) -> np.ndarray:
    """Any PIL-readable image (JPEG, PNG, grayscale, CMYK…) → RGB uint8 ``(H, W, 3)``, bicubic-resized. ``fix``: what
    the error message tells the user to do about an unreadable image."""
    if not data:
        raise DataError(f"image {name} is empty (0 bytes); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError as e:  # PIL's own text names an in-memory buffer, not the file
        raise DataError(f"image {name} cannot be decoded (not in an image format PIL reads); {fix}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {name} cannot be decoded ({e}); {fix}") from e


def _decode_all(
    source: Source,
    records: list[Record],
    cfg: PrepareConfig,
    pool: ThreadPoolExecutor,
    on_image: Callable[[], None] | None,
) -> tuple[np.ndarray, list[Record], list[str]]:
    """Decode ``records``; return the images, the records kept and the paths skipped."""

    def load(rec: Record) -> np.ndarray | None:
        try:
            return decode_image(source.read(rec.path), cfg.image_size, rec.path)
        except DataError:
            if not cfg.skip_bad:
                raise
            return None
        finally:
            if on_image:
                on_image()

    arrays = list(pool.map(load, records))
    kept = [r for r, a in zip(records, arrays, strict=False) if a is not None]
    skipped = [r.path for r, a in zip(records, arrays, strict=False) if a is None]
    if not kept:
        raise DataError(f"no readable image left in a split of {source.label}; check the dataset")
    return np.stack([a for a in arrays if a is not None]), kept, skipped


def prepare_dataset(cfg: PrepareConfig, on_progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Validate the whole layout first (names, splits), then decode and write; the output appears atomically."""
    cfg.validate()
    source = open_source(cfg.root)
    splits = parse_layout(cfg.dataset, source, cfg.cuhk03_subset)
    total = sum(len(r) for r in splits.values())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress and (done % 64 == 0 or done == total):
            on_progress(done, total)

    rows, skipped = [], []
    with (
        ThreadPoolExecutor(cfg.workers) as pool,
        write_dataset(cfg.out, cfg.dataset, cfg.image_size, source=str(cfg.root)) as writer,
    ):
        for split in SPLITS:
            images, kept, bad = _decode_all(source, splits[split], cfg, pool, tick)
            pids = np.array([r.pid for r in kept], dtype=np.int64)
            camids = np.array([r.camid for r in kept], dtype=np.int64)
            writer.add_split(split, pids, camids, [r.path for r in kept])[...] = images
            skipped += bad
            rows.append(
                {
                    "split": split,
                    "images": len(kept),
                    "ids": int(len(np.unique(pids))),
                    "cameras": int(len(np.unique(camids))),
                }
            )
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    return PrepareResult(out=cfg.out, rows=rows, skipped=skipped)
