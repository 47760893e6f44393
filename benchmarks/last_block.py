"""The last block for the CLS token alone against the whole block, interleaved A/B in one process (CPU or GPU).

    python -m benchmarks.last_block [--out benchmarks/results/last_block_cpu.json]

Per model: the training step (CE on the logits, SGD) with ``patches=False`` (what ``reid train`` runs for CLS-only
losses) against ``patches=True`` (the last block for every token), and the test feature (``reid extract``'s
forward) against ``forward_features`` (every token). Rounds alternate the two ways; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from reidcli.model.vit import ModelConfig, ViTReID


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ab(cfg: ModelConfig, batch: int, rounds: int, dev: torch.device) -> dict:
    torch.manual_seed(0)
    model = ViTReID(cfg).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, *cfg.image_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)

    def step(patches: bool) -> None:
        torch.nn.functional.cross_entropy(model(x, patches=patches).logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(every_token: bool) -> None:
        model.eval()
        model.forward_features(x) if every_token else model._test_feature(x)
        model.train()

    ways = {
        "train_cls_only": lambda: step(False),
        "train_every_token": lambda: step(True),
        "infer_cls_only": lambda: infer(False),
        "infer_every_token": lambda: infer(True),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in ways.items():
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t)
    out = {f"{k}_img_s": batch / statistics.median(v) for k, v in times.items()}
    out["train_speedup"] = out["train_cls_only_img_s"] / out["train_every_token_img_s"]
    out["infer_speedup"] = out["infer_cls_only_img_s"] / out["infer_every_token_img_s"]
    return {"pe": cfg.pe, "image_size": list(cfg.image_size), "batch": batch, **out}


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    demo = dict(num_classes=100, image_size=(128, 64), dim=128, depth=4, heads=4, drop_path=0.0)
    models = {
        "demo 4x128 ape": (ModelConfig(pe="ape", **demo), 32),
        "demo 4x128 both": (ModelConfig(pe="both", **demo), 32),
        "vit_tiny both 256x128": (ModelConfig.from_preset("vit_tiny", pe="both", num_classes=751), 16),
    }
    if dev.type == "cuda":
        models["vit_base both 256x128"] = (ModelConfig.from_preset("vit_base", pe="both", num_classes=751), 64)
    rows = {name: ab(cfg, batch, args.rounds, dev) for name, (cfg, batch) in models.items()}
    for name, r in rows.items():
        print(
            f"{name:24s} train {r['train_cls_only_img_s']:8.1f} vs {r['train_every_token_img_s']:8.1f} img/s "
            f"({r['train_speedup']:.3f}x)  infer {r['infer_cls_only_img_s']:8.1f} vs "
            f"{r['infer_every_token_img_s']:8.1f} ({r['infer_speedup']:.3f}x)"
        )
    name = torch.cuda.get_device_name() if dev.type == "cuda" else _cpu_name()
    result = {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    out = Path(args.out or f"benchmarks/results/last_block_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
