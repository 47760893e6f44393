"""Public dataset layouts → (relative path, pid, 0-based camera) records per split.

Conventions follow the published protocol (and torchreid): pid −1 (junk) is dropped from every split;
pid 0 (distractors) stays in the gallery; MSMT17's train is ``list_train`` + ``list_val``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from reidcli.data.naming import IMAGE_SUFFIXES, parse_market_name, parse_msmt_name
from reidcli.data.sources import Source
from reidcli.errors import DataError

__all__ = ["Record", "DATASETS", "parse_layout", "SPLITS", "is_image"]

SPLITS = ("train", "query", "gallery")
DATASETS = ("market1501", "dukemtmcreid", "occludedduke", "msmt17", "cuhk03np", "veri776", "synthetic", "custom")
_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# VeRi-776 (vehicles, TransReID's benchmark): `0001_c001_00016450_0.jpg` in image_train/, image_query/, image_test/
_VERI_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}


@dataclass(frozen=True)
class Record:
    path: str  # relative to the source root
    pid: int
    camid: int  # 0-based


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _find_prefix(files: list[str], marker: str, source: Source, hint: str) -> str:
    """The folder (relative, '' for the root) that directly contains ``marker``."""
    prefixes = set()
    for f in files:
        parts = PurePosixPath(f).parts
        if marker in parts[:-1]:
            prefixes.add("/".join(parts[: parts.index(marker)]))
    if not prefixes:
        raise DataError(f"no '{marker}' found under {source.label}; expected {hint}")
    if len(prefixes) > 1:
        listed = ", ".join(sorted(p or "." for p in prefixes))
        raise DataError(f"several '{marker}' folders under {source.label} ({listed}); point --root at one of them")
    return prefixes.pop()


def _market_style(
    source: Source, files: list[str], subset: str = "", folders: dict[str, str] = _MARKET_FOLDERS, name: str = ""
) -> dict[str, list[Record]]:
    """Market-1501's naming in its three folders (``folders``: VeRi-776 names them otherwise); ``subset``: the
    folder holding them (CUHK03-NP's detected/labeled)."""
    hint = f"the {name or 'Market-1501'} layout: {', '.join(f + '/' for f in folders.values())}"
    marker = folders["train"]
    prefix = _find_prefix(files, marker, source, hint)
    if subset and not prefix.endswith(subset):
        candidates = [f for f in files if f"/{subset}/{marker}/" in f"/{f}"]
        if not candidates:
            raise DataError(f"no '{subset}/{marker}' under {source.label}; expected {hint} in {subset}/")
        prefix = _find_prefix(candidates, marker, source, hint)
    out: dict[str, list[Record]] = {}
    for split, folder in folders.items():
        base = f"{prefix}/{folder}/" if prefix else f"{folder}/"
        names = [f for f in files if f.startswith(base) and "/" not in f[len(base) :] and is_image(f)]
        records = []
        for f in names:
            pid, cam = parse_market_name(f[len(base) :])
            if pid == -1 or (pid == 0 and split != "gallery"):
                continue
            records.append(Record(f, pid, cam))
        out[split] = records
    return out


def _msmt17(source: Source, files: list[str]) -> dict[str, list[Record]]:
    hint = "the MSMT17 layout: train/, test/ and list_{train,val,query,gallery}.txt"
    names = {PurePosixPath(f).name: f for f in files if f.endswith(".txt")}
    missing = [n for n in ("list_train.txt", "list_query.txt", "list_gallery.txt") if n not in names]
    if missing:
        raise DataError(f"{', '.join(missing)} not found under {source.label}; expected {hint}")
    prefix = str(PurePosixPath(names["list_train.txt"]).parent)
    prefix = "" if prefix == "." else prefix + "/"

    def image_dir(*options: str) -> str:
        for o in options:
            if any(f.startswith(prefix + o + "/") for f in files):
                return prefix + o + "/"
        raise DataError(f"none of {', '.join(options)} found under {source.label}; expected {hint}")

    train_dir, test_dir = image_dir("train", "mask_train_v2"), image_dir("test", "mask_test_v2")

    def read_list(name: str, folder: str) -> list[Record]:
        records = []
        text = source.read(names[name]).decode("utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{name} line {n} is not 'PATH PID': {line!r}; restore the original list file")
            rel = parts[0]
            records.append(Record(folder + rel, int(parts[1]), parse_msmt_name(PurePosixPath(rel).name)))
        return records

    train = read_list("list_train.txt", train_dir)
    if "list_val.txt" in names:
        train += read_list("list_val.txt", train_dir)
    return {
        "train": train,
        "query": read_list("list_query.txt", test_dir),
        "gallery": read_list("list_gallery.txt", test_dir),
    }


def parse_layout(dataset: str, source: Source, cuhk03_subset: str = "detected") -> dict[str, list[Record]]:
    """Records per split, validated: no split may be empty."""
    files = source.files()
    if not files:
        raise DataError(f"dataset root {source.label} is empty; pass the extracted dataset folder with --root")
    if dataset in ("market1501", "dukemtmcreid", "occludedduke", "synthetic", "custom"):  # custom: Market's layout
        splits = _market_style(source, files)
    elif dataset == "veri776":
        splits = _market_style(source, files, folders=_VERI_FOLDERS, name="VeRi-776")
    elif dataset == "cuhk03np":
        splits = _market_style(source, files, subset=cuhk03_subset)
    elif dataset == "msmt17":
        splits = _msmt17(source, files)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    for split, records in splits.items():
        if not records:
            raise DataError(f"the {split} split under {source.label} has no images; check the dataset is complete")
    return splits
