"""Atomic file writes: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from reidcli.errors import ConfigError

__all__ = ["atomic_path", "atomic_paths", "write_json_atomic", "sha256_file", "os_error_text"]

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
    with atomic_paths((final, suffix)) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*targets: tuple[str | os.PathLike, str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together, given as ``(final, suffix)``: one temporary path each,
    all renamed into place at the end with SIGINT/SIGTERM held back, so a signal cannot land between the renames
    (it is handled right after them); an exception before that removes every temporary file."""
    tmps = []
    try:
        for final, suffix in targets:
            tmps.append(_claim(Path(final), suffix))
        yield tmps
        with _signals_deferred():
            for tmp, (final, _) in zip(tmps, targets, strict=True):
                os.chmod(tmp, 0o666 & ~_UMASK)  # created 0600; finished files get the usual permissions
                os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _LIVE.difference_update(tmps)


def _claim(final: Path, suffix: str) -> Path:
    """A new, empty temporary file beside ``final``, registered (for cleanup at exit) before it exists."""
    if final.is_dir():
        raise ConfigError(f"{final} is a folder; pass the path of a file to write, e.g. {final / ('NAME' + suffix)}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write {final}: {os_error_text(e)}; choose another path") from e
    while True:
        tmp_path = final.parent / f".{final.name}.{secrets.token_hex(6)}{suffix}.tmp"
        _LIVE.add(tmp_path)
        try:
            os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return tmp_path
        except FileExistsError:  # another writer's name (2⁻⁴⁸ odds): draw again
            _LIVE.discard(tmp_path)
        except OSError as e:  # no permission, a read-only or full file system
            _LIVE.discard(tmp_path)
            raise ConfigError(f"cannot write {final}: {e.strerror or e}; choose another path") from e
        except BaseException:
            _LIVE.discard(tmp_path)
            tmp_path.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held for the block and handled when it ends, by their own handlers (in the main thread).

    The handlers are swapped for ones that only take note: masking the signals would not do, as a process-directed
    signal goes to any thread that does not mask it (torch's worker threads), and Python then runs the handler in
    the main thread at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler installed outside Python, left alone
            held[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # its own handler runs now, as if it had arrived here


def os_error_text(e: OSError) -> str:
    """``'Not a directory: a/b'``: what the system said, and the path it said it of (a rename's target)."""
    path = e.filename2 if e.filename2 is not None else e.filename
    reason = e.strerror or type(e).__name__
    return f"{reason}: {path}" if path is not None else reason


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
