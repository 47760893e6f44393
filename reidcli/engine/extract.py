"""Feature extraction: every image of a split embedded in dataset order, L2-normalised, written atomically."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reidcli.data.augment import normalize_batch
from reidcli.data.store import read_dataset
from reidcli.engine.checkpoint import RunFiles, load_run_model
from reidcli.errors import ConfigError
from reidcli.fileio import sha256_file
from reidcli.retrieval.evaluate import resolve_device
from reidcli.retrieval.features import FeatureSplit, write_features

__all__ = ["ExtractConfig", "embed_images", "embed_dataset", "extract_features"]


@dataclass(frozen=True)
class ExtractConfig:
    run: str
    data: str
    out: str
    splits: tuple[str, ...] = ("query", "gallery")
    batch: int = 256
    flip: bool = True
    # float32 by default: small from-scratch models give features with a large shared component (cosines ≈ 0.999),
    # whose rankings float16 rounding would change.
    dtype: str = "float32"
    device: str = "auto"

    def validate(self) -> ExtractConfig:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError("--dtype must be float16 or float32")
        if self.batch < 1:
            raise ConfigError("--batch must be positive")
        return self


@torch.no_grad()
def embed_images(
    model,
    images: np.ndarray,
    device: torch.device,
    batch: int = 256,
    flip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, D) L2-normalised features, row i for image i."""
    model.eval()
    autocast = device.type == "cuda"
    out = []
    for i in range(0, len(images), batch):
        x = normalize_batch(torch.from_numpy(images[i : i + batch]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(model.embed(x, flip=flip).float().cpu())
        if on_batch:
            on_batch(min(i + batch, len(images)))
    return torch.cat(out).numpy()


def embed_dataset(
    model,
    data: str | Path,
    splits: tuple[str, ...],
    device: torch.device,
    batch: int = 256,
    flip: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, FeatureSplit]:
    attrs, parts = read_dataset(data, splits)
    size = tuple(attrs["image_size"])
    if tuple(model.cfg.image_size) != size:
        raise ConfigError(
            f"the dataset images are {size[0]}x{size[1]} but the model was trained on "
            f"{model.cfg.image_size[0]}x{model.cfg.image_size[1]}; prepare the data at that size"
        )
    return {
        s: FeatureSplit(embed_images(model, p.images, device, batch, flip, on_batch), p.pids, p.camids, p.paths)
        for s, p in parts.items()
    }


def extract_features(cfg: ExtractConfig, on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write the features HDF5 with provenance; return the number of rows per split."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, config, source = load_run_model(cfg.run, device)
    feats = embed_dataset(model, cfg.data, cfg.splits, device, cfg.batch, cfg.flip, on_batch)
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    feats = {s: FeatureSplit(f.feats.astype(dtype), f.pids, f.camids, f.paths) for s, f in feats.items()}
    provenance = {
        "model_config": config["model"],
        "checkpoint": str(source),
        "checkpoint_sha256": sha256_file(source),
        "dataset": str(config.get("dataset", "")),
        "dataset_file": str(cfg.data),
        "flip": int(cfg.flip),
        "run": str(RunFiles(cfg.run).root),
    }
    write_features(cfg.out, feats, provenance)
    return {s: len(f) for s, f in feats.items()}
