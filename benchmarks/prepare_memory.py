"""Peak memory and wall time of ``reid prepare`` on a Market-layout folder with a large gallery.

    python -m benchmarks.prepare_memory [--gallery 15740] [--size 256x128] [--ids 100] \\
        [--out benchmarks/results/prepare_cpu.json]

The folder is the synthetic generator's (100 ids, 128×64 JPEGs) with its gallery repeated under new Market-1501
names (hard links) up to ``--gallery`` images; ``reid prepare market1501`` runs in a child process, whose peak
resident memory is read from ``getrusage(RUSAGE_CHILDREN)``. Decoding a block at a time, the peak should stay near
the interpreter's own (~0.1 GB) whatever the gallery's size; holding a whole split took about twice its pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pictures import _cpu_name
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic


def _market_folder(root: Path, gallery: int, ids: int) -> int:
    generate_synthetic(root, SyntheticConfig(num_train_ids=ids, num_test_ids=ids, seed=0))
    test = root / "bounding_box_test"
    originals = sorted(test.glob("*.jpg"))
    made, copy = len(originals), 0
    while made < gallery:
        for src in originals:
            if made >= gallery:
                break
            os.link(src, test / f"{src.stem}_{copy:03d}.jpg")  # same PID_cCAM… prefix: same identity and camera
            made += 1
        copy += 1
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=15740)
    ap.add_argument("--size", default="256x128")
    ap.add_argument("--ids", type=int, default=100, help="synthetic identities in train and in test, each")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "market"
        files = _market_folder(root, args.gallery, args.ids)
        start = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "reidcli", "prepare", "market1501", "--root", str(root), "--out",
             str(Path(tmp) / "m.h5"), "--image-size", args.size, "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if r.returncode != 0:
            sys.exit(r.stderr)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        rows = {row["split"]: row["images"] for row in json.loads(r.stdout)["splits"]}
        shutil.rmtree(root)
    h, w = (int(x) for x in args.size.split("x"))
    result = {
        "machine": _cpu_name(),
        "cores": os.cpu_count(),
        "image_size": [h, w],
        "gallery_files": files,
        "images": rows,
        "gallery_pixels_gb": round(rows["gallery"] * h * w * 3 / 2**30, 3),
        "peak_rss_gb": round(peak_gb, 3),
        "wall_s": round(wall, 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
