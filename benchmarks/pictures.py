"""Seconds per picture at the sizes a ViT-B run on Market-1501 draws (256×128 images, 16×8 patch grid, 12 layers ×
12 heads): the ranked lists of ``evaluate --visualize`` / ``search`` / ``ablate``, and ``reid plot``'s APE and RPE maps.

    python -m benchmarks.pictures [--out benchmarks/results/pictures_cpu.json]

Each picture is drawn 3 times after one warm-up (matplotlib imported); the median is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from reidcli.report.plots import plot_ape_similarity, plot_ranked_lists, plot_rpe_bias


def _images(rng: np.random.Generator, *lead: int) -> np.ndarray:
    """Blocky images that compress like photographs of people (not like noise): 32×16 colours, each 8×8 pixels."""
    small = rng.integers(0, 256, (*lead, 32, 16, 3), dtype=np.uint8)
    return small.repeat(8, axis=-3).repeat(8, axis=-2)


def _median(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, g = _images(rng, 10), _images(rng, 10, 10)
    status = rng.integers(-1, 2, (10, 10))
    grid, dim, layers, heads = (16, 8), 768, 12, 12
    pos = rng.normal(size=(grid[0] * grid[1], dim))
    tables = rng.normal(size=(layers, (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = {
            "ranked lists 10 queries top-10 256x128 s": _median(
                lambda: plot_ranked_lists(q, g, status, out / "r.png", "top-10 of 10 queries")
            ),
            "APE similarity 16x8 grid s": _median(lambda: plot_ape_similarity(pos, grid, out / "a.png")),
            "RPE bias 12 layers x 12 heads s": _median(lambda: plot_rpe_bias(tables, grid, out / "b.png")),
        }
    report = {"machine": _cpu_name(), "cores": os.cpu_count(), "seconds": rows}
    for name, value in rows.items():
        print(f"{name:45s} {value:6.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
