"""Atomic file writes: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_json_atomic", "sha256_file"]

_UMASK = os.umask(0)
os.umask(_UMASK)


_LIVE: set[Path] = set()  # temporary files not yet renamed or removed (see _remove_leftovers)


@atexit.register
def _remove_leftovers() -> None:
    """At exit, remove the temporary files whose writer never got to clean up: a signal turned into an exception
    can land in ``contextlib``'s own frames (before the generator below resumes), where no ``except`` of ours
    runs, and the suspended generator is not always closed before the interpreter ends."""
    for tmp in list(_LIVE):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder; rename it to ``final`` only if the block succeeds.

    An exception (or a signal turned into one) removes the temporary file, so ``final`` is either the old
    file or the complete new one, never a half-written file. The name is registered before the file exists, so
    even an interruption between the two is cleaned up at exit.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp_path = final.parent / f".{final.name}.{secrets.token_hex(6)}{suffix}.tmp"
        _LIVE.add(tmp_path)
        try:
            os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:  # another writer's name (2⁻⁴⁸ odds): draw again
            _LIVE.discard(tmp_path)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # created 0600; finished files get the usual permissions
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        _LIVE.discard(tmp_path)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
