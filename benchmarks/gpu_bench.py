"""Every speed target of DESIGN.md on one GPU, beside the peer baseline (run through benchmarks/gpu.sh).

    python benchmarks/gpu_bench.py [--peer PEER.json] [--out DIR] [--smoke] [--no-compile]

``--smoke`` runs every section at toy sizes on whatever device there is (the CPU here), so the script is exercised
by the test suite and cannot rot between GPU sessions. Writes ``gpu_bench.json`` into ``--out`` (default $OUT)
and prints one table last: what, ours, peer, ratio, target.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.model_speed import measure
from reidcli.model.vit import ModelConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _bench_model(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(image_size=(64, 32), dim=64, depth=2, heads=4)
    return ModelConfig.from_preset("vit_base", image_size=(256, 128))


def train_steps(smoke: bool) -> dict:
    """Eager training steps for every --pe at batch 64 and 256 (bf16 on CUDA)."""
    out = {}
    for batch in (8,) if smoke else (64, 256):
        for pe in ("none", "ape", "sincos", "rpe", "both"):
            out[f"train {pe} b{batch}"] = measure(pe, _bench_model(smoke), batch, DEV, False, 3 if smoke else 10)
    return out


def compiled_steps(smoke: bool) -> dict:
    """torch.compile'd steps (slow to build: run last, so a timeout loses only these)."""
    cfg = _bench_model(smoke)
    return {
        f"train {pe} b64 compiled": measure(pe, cfg, 8 if smoke else 64, DEV, True, 3 if smoke else 10)
        for pe in ("ape", "rpe", "both")
    }


def _market_like_dataset(path: Path, n_train: int, n_ids: int, size: tuple[int, int]) -> None:
    """A dataset HDF5 of Market's size: synthetic pedestrians drawn once per identity-camera, tiled."""
    from reidcli.data.store import write_dataset
    from reidcli.data.synthetic import SyntheticConfig, _camera_style, draw_person, make_identity

    cfg = SyntheticConfig()
    rng = np.random.default_rng(0)
    pids = np.sort(np.arange(n_train) % n_ids) + 1
    cams = rng.integers(0, 6, n_train)
    base = {}
    with write_dataset(path, "synthetic-market-size", size) as w:
        for split, n in (("train", n_train), ("query", 64), ("gallery", 256)):
            p, c = (pids[:n], cams[:n]) if split == "train" else (np.arange(n) % 16 + 1, np.arange(n) % 6)
            images = w.add_split(split, p, c, [f"{split}/{i}.jpg" for i in range(n)])
            block = []
            for i in range(n):
                key = (int(p[i]), int(c[i]))
                if key not in base:
                    style = _camera_style(0, key[1], cfg.difficulty)
                    arr = torch.from_numpy(draw_person(make_identity(0, key[0]), rng, style, cfg.difficulty).copy())
                    big = torch.nn.functional.interpolate(
                        arr.permute(2, 0, 1)[None].float(), size=size, mode="bilinear"
                    )
                    base[key] = big[0].permute(1, 2, 0).byte().numpy()
                block.append(base[key])
                if len(block) == 1024 or i == n - 1:
                    images[i + 1 - len(block) : i + 1] = np.stack(block)
                    block = []


def market_epoch(smoke: bool, tmp: Path) -> dict:
    """One epoch of ViT-B/16 `both` training from a dataset HDF5 of 12,936 images: data path included."""
    from reidcli.engine.train import TrainConfig, train

    n, ids, size = (256, 32, (64, 32)) if smoke else (12936, 751, (256, 128))
    data = tmp / "market_size.h5"
    t = time.perf_counter()
    _market_like_dataset(data, n, ids, size)
    build_s = time.perf_counter() - t
    model = (
        ModelConfig(pe="both", image_size=size, dim=64, depth=2, heads=4)
        if smoke
        else ModelConfig.from_preset("vit_base", pe="both", image_size=size)
    )
    cfg = TrainConfig(
        data=str(data),
        run_dir=str(tmp / "epoch_run"),
        model=model,
        epochs=2,
        batch=64,
        k=4,
        device=str(DEV),
        warmup_epochs=1,
    )
    t = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t
    rows = result.metrics
    return {
        "images": n,
        "dataset_build_s": build_s,
        "epoch1_s": rows[0]["seconds"],
        "epoch2_s": rows[1]["seconds"],
        "epoch2_img_s": rows[1]["images_per_s"],
        "two_epochs_wall_s_incl_load_and_save": wall,
    }


def extraction(smoke: bool) -> dict:
    from reidcli.engine.extract import embed_images
    from reidcli.model.vit import ViTReID

    cfg = (
        ModelConfig(image_size=(64, 32), dim=64, depth=2, heads=4)
        if smoke
        else ModelConfig.from_preset("vit_base", image_size=(256, 128))
    )
    out = {}
    n = 512 if smoke else 19281
    images = np.random.default_rng(0).integers(0, 256, (n, *cfg.image_size, 3), dtype=np.uint8)
    for pe in ("ape", "both"):
        model = ViTReID(ModelConfig(**{**cfg.to_dict(), "pe": pe})).to(DEV)
        embed_images(model, images[:1024], DEV, batch=512, flip=False)  # warm-up
        for flip in (False, True):
            _sync()
            t = time.perf_counter()
            embed_images(model, images, DEV, batch=512, flip=flip)
            _sync()
            out[f"extract {pe}{' flip' if flip else ''}"] = n / (time.perf_counter() - t)
    return out


def evaluation(smoke: bool) -> dict:
    from benchmarks.cpu_eval import TRAINED, market_like
    from reidcli.retrieval.evaluate import EvalConfig, evaluate

    sizes = {"market": (3368, 15913, 750), "msmt17": (11659, 82161, 3060), "market500k": (3368, 500_000, 750)}
    if smoke:
        sizes = {k: (q // 50, g // 100, i // 20) for k, (q, g, i) in sizes.items()}
    out = {}
    cfg = EvalConfig(engine="torch", device=str(DEV), memory_mb=256 if smoke else 16384)
    for name, (nq, ng, ids) in sizes.items():
        q, g = market_like(nq, ng, ids, seed=1, noise=TRAINED)
        evaluate(q, g, cfg)  # warm-up
        runs = [evaluate(q, g, cfg) for _ in range(3)]
        out[f"eval {name} ms"] = 1e3 * min(r.seconds for r in runs)
        out[f"eval {name} mAP"] = runs[0].metrics.mAP
        if name == "market":
            cpu = evaluate(q, g, EvalConfig(engine="torch", device="cpu")).metrics
            gpu = runs[0].metrics
            out["market gpu-cpu max metric diff"] = max(
                abs(gpu.mAP - cpu.mAP),
                abs(gpu.mINP - cpu.mINP),
                max(abs(a - b) for a, b in zip(gpu.cmc, cpu.cmc, strict=True)),
            )
            rr = EvalConfig(engine="torch", device=str(DEV), rerank=True, memory_mb=cfg.memory_mb)
            evaluate(q, g, rr)
            out["rerank market s"] = min(evaluate(q, g, rr).seconds for _ in range(2))
    return out


PEER_KEYS = {  # our key → (peer key in peer_baseline.py's JSON, higher is better, target)
    "train ape b64": ("train vit_base_patch16_224 256x128 b64 bf16 eager", True, 5000),
    "train rpe b64": ("train vit_relpos_base_patch16_224 256x128 b64 bf16 eager", True, 4500),
    "train both b64": ("train vit_relpos_base_patch16_224 256x128 b64 bf16 eager", True, 4500),
    "train ape b64 compiled": ("train vit_base_patch16_224 256x128 b64 bf16 compiled", True, 5000),
    "extract ape": ("infer vit_base_patch16_224 256x128 b512 bf16 eager", True, 20000),
    "extract both": ("infer vit_relpos_base_patch16_224 256x128 b512 bf16 eager", True, 20000),
    "eval market ms": ("exact sim+full sort 3368x15913 d768 fp32", False, 3),
    "eval msmt17 ms": ("exact sim+full sort 11659x82161 d768 fp32", False, 50),
    "eval market500k ms": ("exact sim+full sort 3368x500000 d768 fp32", False, 80),
}


def table(flat: dict, peer: dict) -> list[tuple]:
    rows = []
    for key, value in flat.items():
        if not isinstance(value, (int, float)):
            continue
        peer_key, higher, target = PEER_KEYS.get(key, (None, True, None))
        p = peer.get(peer_key) if peer_key else None
        ratio = (value / p if higher else p / value) if p else None
        rows.append((key, value, p, ratio, target))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", help="peer_baseline.py's JSON (anchor_gpu.json)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sections", default="eval,extract,train,epoch,compile")
    args = ap.parse_args()
    sections = args.sections.split(",")
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    flat: dict = {}
    peer = json.loads(Path(args.peer).read_text()) if args.peer and Path(args.peer).is_file() else {}
    result["peer"] = peer
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            "eval": lambda: evaluation(args.smoke),
            "extract": lambda: extraction(args.smoke),
            "train": lambda: train_steps(args.smoke),
            "epoch": lambda: market_epoch(args.smoke, Path(tmp)),
            "compile": lambda: {} if args.no_compile else compiled_steps(args.smoke),
        }
        for section in sections:  # quick, central sections first; JSON rewritten after each one
            t = time.perf_counter()
            try:
                result[section] = steps[section]()
            except Exception as e:  # noqa: BLE001 — one failing section must not lose the others' numbers
                result[section] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{section}] {time.perf_counter() - t:.1f}s", flush=True)
            for k, v in result[section].items():
                flat[k] = v["train_img_s"] if isinstance(v, dict) and "train_img_s" in v else v
            if section == "epoch" and "epoch2_s" in result["epoch"]:
                flat["market epoch s"] = result["epoch"]["epoch2_s"]
            (Path(args.out) / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{'what':44s} {'ours':>12s} {'peer':>12s} {'ratio':>7s} {'target':>8s}   ({name})")
    for key, value, p, ratio, target in table(flat, peer):
        print(
            f"{key:44s} {value:12.3f} {p if p is not None else float('nan'):12.3f} "
            f"{ratio if ratio is not None else float('nan'):7.2f} {target if target else '':>8}"
        )


if __name__ == "__main__":
    main()
