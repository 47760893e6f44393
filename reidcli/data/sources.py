"""Where a dataset's files come from: an extracted folder or its zip, read in place (never extracted)."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Protocol

from reidcli.errors import DataError

__all__ = ["Source", "FolderSource", "ZipSource", "open_source"]


class Source(Protocol):
    label: str

    def files(self) -> list[str]:
        """All file paths, POSIX-style, relative to the source root."""
        ...

    def read(self, rel: str) -> bytes: ...


class FolderSource:
    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class ZipSource:
    """Members are read straight from the archive; names that would escape a folder are refused."""

    def __init__(self, path: Path):
        self.label = str(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path} is not a readable zip archive ({e}); pass the extracted folder instead") from e
        names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        for name in names:
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts:
                raise DataError(f"{path} holds an unsafe member name {name!r} (absolute or with '..'); refusing it")
        nested = [n for n in names if n.lower().endswith(".zip")]
        if nested and len(nested) == len(names):
            raise DataError(
                f"{path} only holds other zip archives ({nested[0]}…): unzip it once and pass the inner zip"
            )
        self._names = sorted(names)

    def files(self) -> list[str]:
        return self._names

    def read(self, rel: str) -> bytes:
        return self._zip.read(rel)


def open_source(root: str | Path) -> Source:
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"dataset root {root} does not exist; pass the extracted dataset folder (or its zip) with --root"
        )
    if root.is_file():
        if zipfile.is_zipfile(root):
            return ZipSource(root)
        raise DataError(f"{root} is a file but not a zip archive; pass the extracted dataset folder or its zip")
    return FolderSource(root)
