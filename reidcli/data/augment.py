"""Batched training augmentation on the training device: flip, pad + random crop, normalise, random erasing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reidcli.errors import ConfigError

__all__ = [
    "AUGMENT_DRAWS",
    "AUGMENT_FLAGS",
    "ERASE_FILLS",
    "AugmentConfig",
    "augment_batch",
    "normalize_batch",
    "parse_erase_area",
]

AUGMENT_DRAWS = 8  # uniform numbers one image's augmentation takes
ERASE_FILLS = ("grey", "noise")
# AugmentConfig's options and their flags (train, ablate), as resume messages and `ablate --vary` name them too
AUGMENT_FLAGS = {
    "flip": "flip-prob",
    "pad": "pad",
    "erase": "erase-prob",
    "erase_area": "erase-area",
    "erase_ratio": "erase-ratio",
    "erase_fill": "erase-fill",
}
ERASE_OPTIONS = ("erase_area", "erase_ratio", "erase_fill")  # what acts only with erasing on


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5
    pad: int = 10
    erase: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_ratio: float = 0.3  # aspect ratios in [r, 1/r]
    # what an erased rectangle holds: "grey" (0 after normalisation) or "noise", N(0, 1) per pixel and channel after
    # normalisation, as TransReID's random erasing (timm's mode='pixel')
    erase_fill: str = "grey"

    def validate(self) -> AugmentConfig:
        for flag, p in (("flip-prob", self.flip), ("erase-prob", self.erase)):
            if not 0 <= p <= 1:
                raise ConfigError(f"--{flag} {p} is not a probability; give a value from 0 (off) to 1")
        if self.erase_fill not in ERASE_FILLS:
            raise ConfigError(f"unknown --erase-fill {self.erase_fill!r}; choose one of {', '.join(ERASE_FILLS)}")
        lo, hi = self.erase_area
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"--erase-area {lo:g}-{hi:g}: give LO-HI with 0 < LO <= HI <= 1 (the erased share of the image, e.g. "
                "0.02-0.4)"
            )
        if not 0 < self.erase_ratio <= 1:
            raise ConfigError(
                f"--erase-ratio {self.erase_ratio:g} must lie in (0, 1]: aspect ratios are drawn from [r, 1/r] "
                "(e.g. 0.3)"
            )
        if self.pad < 0:
            raise ConfigError(f"--pad {self.pad} cannot be negative; give 0 (no pad + random crop) or more pixels")
        return self


def parse_erase_area(text: str) -> tuple[float, float]:
    """``'0.02-0.4'`` → ``(0.02, 0.4)``: the range of random erasing's area, as a share of the image."""
    lo, sep, hi = text.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        return float(lo), float(hi)
    except ValueError:
        raise ConfigError(f"--erase-area {text!r} must be LO-HI, shares of the image's area, e.g. 0.02-0.4") from None


def normalize_batch(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) with mean = std = 0.5."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def augment_batch(
    images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None, r: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device → augmented, normalised float (B, 3, H, W) on the same device.

    Random numbers: ``r`` (B, AUGMENT_DRAWS) uniform in [0, 1) already on the images' device (the trainer draws a
    whole epoch's at once, so a step copies nothing from the host), else one draw from ``gen`` (a CPU generator, so
    runs are reproducible across devices).
    """
    b, h, w, _ = images.shape
    dev = images.device
    if r is None:
        r = torch.rand(b, AUGMENT_DRAWS, generator=gen).to(dev)
    x = normalize_batch(images)
    if cfg.flip > 0:
        x = torch.where((r[:, 0] < cfg.flip)[:, None, None, None], x.flip(3), x)
    if cfg.pad > 0:
        p = cfg.pad
        x = F.pad(x, (p, p, p, p), value=-1.0)  # black border, as torchvision's Pad before Normalize
        oy = (r[:, 1] * (2 * p + 1)).long().clamp_max(2 * p)
        ox = (r[:, 2] * (2 * p + 1)).long().clamp_max(2 * p)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, 3, h, w + 2 * p)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, 3, h, w)
        x = x.gather(2, rows).gather(3, cols)
    if cfg.erase > 0:
        lo, hi = cfg.erase_area
        area = (lo + (hi - lo) * r[:, 3]) * h * w
        logr = math.log(cfg.erase_ratio)  # a Python number: no host-to-device copy
        aspect = torch.exp(logr - 2 * logr * r[:, 4])
        eh = (area * aspect).sqrt().clamp(1, h)
        ew = (area / aspect).sqrt().clamp(1, w)
        y0 = r[:, 5] * (h - eh)
        x0 = r[:, 6] * (w - ew)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        inside_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (B, H)
        inside_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (B, W)
        mask = inside_y[:, :, None] & inside_x[:, None, :] & (r[:, 7] < cfg.erase)[:, None, None]
        if cfg.erase_fill == "noise":  # the device's global generator, as DropPath's (checkpointed, graph-safe)
            x = torch.where(mask[:, None], torch.randn(x.shape, device=dev, dtype=x.dtype), x)
        else:
            x = x.masked_fill(mask[:, None], 0.0)
    return x
