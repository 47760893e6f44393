"""The CPU's compiled kernels (``reidcli/retrieval/_cpu.c``, built at install time where a C compiler is found) and
the threads that run them over row ranges. Every kernel has a torch fallback giving the same results."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["module", "available", "over_rows"]


ABI = 1  # the module's ABI constant this source expects (``CPU_KERNELS_ABI`` in _cpu.c)
_STALE: list[int] = []  # the ABI of an out-of-date build found in this process (warned about once)


def module():
    """The compiled module, or None where it was not built (no C compiler at install time, or a source tree) or was
    built from older source (a ``git pull`` without reinstalling: warned about once, then ignored)."""
    try:
        from reidcli.retrieval import _cpu
    except ImportError:
        return None
    found = getattr(_cpu, "ABI", 0)
    if found != ABI:
        if not _STALE:
            _STALE.append(found)
            warnings.warn(
                f"reidcli's compiled CPU kernels are out of date (ABI {found}, this source wants {ABI}); using the "
                "torch fallbacks. Reinstall to rebuild them: pip install -e .",
                stacklevel=2,
            )
        return None
    return _cpu


def available() -> bool:
    """Whether the compiled CPU kernels were built at install time."""
    return module() is not None


# one pool for every kernel's row ranges, sized to torch's CPU threads, with the process that made it: a forked
# child inherits the pool object but not its threads, and must make its own
_POOL: list[tuple[int, ThreadPoolExecutor]] = []


def over_rows(num_rows: int, fn: Callable[[int, int], None], min_rows: int = 4) -> None:
    """``fn(r0, r1)`` over contiguous row ranges covering ``num_rows``, one per torch CPU thread (the kernels
    release the GIL), each at least ``min_rows`` rows."""
    threads = max(1, min(torch.get_num_threads(), num_rows // max(min_rows, 1)))
    if threads == 1:
        fn(0, num_rows)
        return
    if not _POOL or _POOL[0][0] != os.getpid() or _POOL[0][1]._max_workers != threads:
        _POOL[:] = [(os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="reidcli-cpu"))]
    step = math.ceil(num_rows / threads)
    list(_POOL[0][1].map(lambda r0: fn(r0, min(num_rows, r0 + step)), range(0, num_rows, step)))
