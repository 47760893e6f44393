"""Embedding throughput of an exported ONNX file in onnxruntime beside reidcli's own CPU path (``reid extract``).

    python -m benchmarks.onnx_cpu [--smoke] [--images 512] [--batch 64] [--out benchmarks/results/onnx_cpu.json]

Models: the demo's (dim 128, depth 4, 128×64) and ViT-S/16 at 256×128, both ``--pe both``, flip averaging on (as
``reid extract`` and ``reid export`` default), random weights (the speed does not depend on them). Each model is
written as a run folder, exported by ``reid export``'s code, and timed on the same uint8 images: onnxruntime (CPU
provider, its default threads), reidcli fp32 (oneDNN products) and reidcli bf16 autocast. The largest |Δ| between
onnxruntime's and reidcli's fp32 features is recorded beside the speeds.
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
import torch

from reidcli.engine.checkpoint import RunFiles, save_weights, write_json_atomic
from reidcli.engine.export import ExportConfig, export_onnx
from reidcli.engine.extract import embed_images
from reidcli.model.vit import ModelConfig, ViTReID

MODELS = {
    "demo 128x64": {"dim": 128, "depth": 4, "heads": 4, "image_size": (128, 64)},
    "vit_small 256x128": {"dim": 384, "depth": 12, "heads": 6, "image_size": (256, 128)},
}
SMOKE = {"smoke 64x32": {"dim": 32, "depth": 1, "heads": 4, "image_size": (64, 32)}}


def _best(fn, reps: int) -> float:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation, onnxruntime's arena
    return min(_timed(fn) for _ in range(reps))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, spec: dict, images: int, batch: int, reps: int, root: Path) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    cfg = ModelConfig(pe="both", patch_size=16 if spec["dim"] > 32 else 8, stride=16 if spec["dim"] > 32 else 8,
                      drop_path=0.0, num_classes=10, **spec)  # fmt: skip
    model = ViTReID(cfg).eval()
    files = RunFiles(root / name.replace(" ", "_"))
    files.root.mkdir(parents=True)
    write_json_atomic(files.config, {"model": cfg.to_dict()})
    save_weights(files.weights, model, {})
    onnx_path = files.root / "model.onnx"
    exported = export_onnx(ExportConfig(run=str(files.root), out=str(onnx_path)))
    h, w = cfg.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (images, h, w, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cpu = torch.device("cpu")

    def run_ort():
        return np.concatenate([session.run(["features"], {"images": pixels[i : i + batch]})[0]
                               for i in range(0, images, batch)])  # fmt: skip

    row = {"export_s": round(exported.export_seconds, 2), "onnx_mib": round(exported.bytes / 2**20, 1)}
    for label, fn in (
        ("onnxruntime", run_ort),
        ("reidcli fp32", lambda: embed_images(model, pixels, cpu, batch)),
        ("reidcli bf16", lambda: embed_images(model, pixels, cpu, batch, precision="bf16")),
    ):
        row[f"{label} img/s"] = round(images / _best(fn, reps), 1)
    row["max |onnxruntime - reidcli fp32|"] = float(np.abs(run_ort() - embed_images(model, pixels, cpu, batch)).max())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one tiny model, a few images (the test suite's run)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_cpu.json"))
    args = p.parse_args()
    models, images, reps = (SMOKE, 32, 1) if args.smoke else (MODELS, args.images, args.reps)
    import onnxruntime

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
        },
        "images": images,
        "batch": args.batch,
        "flip": True,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in models.items():
            result["models"][name] = measure(name, spec, images, args.batch, reps, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<20} {'onnxruntime':>12} {'reidcli fp32':>13} {'reidcli bf16':>13} {'max |Δ|':>9}  (img/s)")
    for name, row in result["models"].items():
        print(f"{name:<20} {row['onnxruntime img/s']:>12} {row['reidcli fp32 img/s']:>13} "
              f"{row['reidcli bf16 img/s']:>13} {row['max |onnxruntime - reidcli fp32|']:>9.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
