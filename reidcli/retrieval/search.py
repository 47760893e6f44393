"""Search a gallery index with new images: embed them with the gallery's own model, then FAISS.

``reid index`` saves an index of a features file's gallery; this is what it is for outside evaluation: who in the
gallery looks like this person? The query images are decoded and resized as ``reid prepare`` does, embedded by
the run whose weights extracted the gallery (checked by the SHA-256 the features file records, with the same flip
averaging), and searched in the saved index (exact for a flat index, approximate for IVF-PQ).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reidcli.errors import ConfigError, FormatError
from reidcli.retrieval.features import FeatureSplit

__all__ = ["SearchResult", "query_files", "search_images", "resolve_recorded"]


@dataclass(frozen=True)
class SearchResult:
    queries: list[Path]  # the query images, in order
    images: np.ndarray  # (Q, H, W, 3) uint8: the query images as the model saw them
    scores: np.ndarray  # (Q, k) cosine similarity, best first
    rows: np.ndarray  # (Q, k) gallery rows of the features file (−1: fewer than k found, IVF-PQ)
    gallery: FeatureSplit  # the indexed split: pids, camids, paths (features too)
    split: str  # the indexed split's name in the features file
    features: Path  # the features file
    dataset: Path | None  # the dataset file holding the gallery's images (when asked for: pictures)
    run: Path
    exact: bool  # flat index: exact cosine ranking
    checked: bool  # the run's weights were checked against the ones that extracted the gallery

    def to_dict(self) -> dict:
        out = []
        for q, scores, rows in zip(self.queries, self.scores, self.rows, strict=True):
            hits = [
                {
                    "rank": rank,
                    "score": float(score),
                    "row": int(row),
                    "path": self.gallery.paths[row] if self.gallery.paths else "",
                    "pid": int(self.gallery.pids[row]),
                    "camid": int(self.gallery.camids[row]),
                }
                for rank, (score, row) in enumerate(zip(scores, rows, strict=True), 1)
                if row >= 0
            ]
            out.append({"query": str(q), "results": hits})
        return {"features": str(self.features), "run": str(self.run), "exact": self.exact, "queries": out}


def query_files(paths: list[Path]) -> list[Path]:
    """Image files given directly, and the images inside given folders (recursively, sorted by path); each file
    once, in the order first given."""
    from reidcli.data.naming import IMAGE_SUFFIXES

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ConfigError(
                    f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass image files or a folder of them"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"query image {p} not found; pass image files or folders of images")
    return list(dict.fromkeys(files))


def resolve_recorded(recorded: str, near: Path, what: str, option: str) -> Path:
    """A path a file recorded (relative to the folder the command that wrote it ran in): as recorded, else the same
    name beside ``near`` (the file that recorded it), else an error that names ``option``."""
    if not recorded:
        raise ConfigError(f"{near} does not record its {what}; pass {option}")
    candidates = [Path(recorded), near.parent / Path(recorded).name]
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"the {what} {recorded} that {near} records is not found from here; pass {option}")


def search_images(
    index_path: str | Path,
    images: list[Path],
    features: str | Path | None = None,
    run: str | Path | None = None,
    top_k: int = 10,
    device: str = "auto",
    precision: str = "auto",
    batch: int = 256,
    images_from: str | Path | bool | None = None,
    camid: int | None = None,
) -> SearchResult:
    """The ``top_k`` gallery rows nearest each query image, from the index at ``index_path``. ``features`` (default:
    the file the index records) holds the indexed split's labels and paths and names the ``run`` (default: the one
    it records) whose weights embed the queries; those weights must be the ones that extracted the gallery.
    ``images_from``: the dataset file with the gallery's images (True: the one the features file records), checked
    to hold them before any work. ``camid``: the camera (0-based) that took the query images, which a model with
    camera embeddings (SIE) needs."""
    from reidcli.data.prepare import decode_image
    from reidcli.engine.checkpoint import load_run_model
    from reidcli.engine.extract import PRECISIONS, embed_images
    from reidcli.fileio import sha256_file
    from reidcli.retrieval.evaluate import resolve_device
    from reidcli.retrieval.features import read_features
    from reidcli.retrieval.index import check_index_features, load_index, search, to_search_device

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    index_path = Path(index_path)
    index, meta = load_index(index_path)
    split = meta.get("split", "gallery")
    features = (
        Path(features)
        if features
        else resolve_recorded(meta.get("features", ""), index_path, "features file", "--features")
    )
    attrs, splits = read_features(features, (split,))
    gallery = splits[split]
    check_index_features(index_path, index, meta, gallery.feats, gallery.pids)
    files = query_files([Path(p) for p in images])  # checked before the model is loaded
    dataset = None
    if images_from:
        dataset = (
            Path(images_from)
            if images_from is not True
            else resolve_recorded(str(attrs.get("dataset_file", "")), features, "dataset file", "--data")
        )
        from reidcli.report.ranked import holds_images

        if not holds_images(dataset, split, gallery):
            raise FormatError(f"{dataset} does not hold the {split} images of {features}; pass the right --data")
    run = Path(run) if run else resolve_recorded(str(attrs.get("run", "")), features, "run", "--run")
    dev = resolve_device(device)
    model, _, source = load_run_model(run, dev)
    digest = attrs.get("checkpoint_sha256")
    if digest and sha256_file(source) != digest:
        raise ConfigError(
            f"{source} is not the weights the gallery in {features} was extracted with (the SHA-256 differs): queries "
            "and gallery must be embedded by the same weights; pass the --run they came from, or extract and index "
            "the gallery again"
        )
    if model.uses_cameras and camid is None:
        raise ConfigError(
            f"{run}'s model embeds each image's camera (SIE, {model.cfg.sie_cameras} cameras): pass --camid, the "
            "camera that took the query images (0-based, as the gallery's camid column)"
        )
    if camid is not None and not model.uses_cameras:
        raise ConfigError(f"--camid has no effect: {run}'s model has no camera embeddings (SIE); leave it out")
    if camid is not None and not 0 <= camid < model.cfg.sie_cameras:
        raise ConfigError(f"--camid {camid}: {run}'s model embeds cameras 0–{model.cfg.sie_cameras - 1} (SIE)")
    size = tuple(model.cfg.image_size)
    fix = "pass image files (JPEG, PNG, BMP)"
    resize = str(attrs.get("resize", "bicubic"))  # the gallery's images were resized so by 'reid prepare'
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL, as in prepare
        pixels = np.stack(list(pool.map(lambda f: decode_image(f.read_bytes(), size, str(f), fix, resize), files)))
    cams = None if camid is None else np.full(len(files), camid, dtype=np.int64)
    flip = bool(attrs.get("flip", 1))
    queries = embed_images(model, pixels, dev, batch, flip=flip, precision=precision, camids=cams)
    if queries.shape[1] != index.d:
        raise FormatError(f"the model embeds {queries.shape[1]}-d features but the index holds {index.d}-d ones")
    searched, on_gpu = to_search_device(index)
    scores, rows = search(searched, queries, top_k, on_gpu)
    return SearchResult(
        files,
        pixels,
        scores,
        rows,
        gallery,
        split,
        features,
        dataset,
        run,
        bool(meta.get("exact", False)),
        bool(digest),
    )
