"""Batched training augmentation on the training device: colour jitter, flip, pad + random crop, normalise, random
erasing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reidcli.errors import ConfigError

__all__ = [
    "AUGMENT_DRAWS",
    "AUGMENT_FLAGS",
    "AUGMENT_PARSERS",
    "ERASE_FILLS",
    "JITTER_DRAWS",
    "AugmentConfig",
    "augment_batch",
    "color_jitter",
    "normalize_batch",
    "parse_erase_area",
    "parse_jitter",
]

AUGMENT_DRAWS = 8  # uniform numbers one image's augmentation takes (flip, crop, erasing)
JITTER_DRAWS = 9  # and the colour jitter's, when it is on: whether, four factors, four keys of the random order
ERASE_FILLS = ("grey", "noise")
# AugmentConfig's options and their flags (train, ablate), as resume messages and `ablate --vary` name them too
AUGMENT_FLAGS = {
    "flip": "flip-prob",
    "pad": "pad",
    "erase": "erase-prob",
    "erase_area": "erase-area",
    "erase_ratio": "erase-ratio",
    "erase_fill": "erase-fill",
    "jitter": "jitter-prob",
    "jitter_strength": "jitter",
}
ERASE_OPTIONS = ("erase_area", "erase_ratio", "erase_fill")  # what acts only with erasing on
JITTER_OPTIONS = ("jitter",)  # the command parameter that acts only with --jitter-prob above 0


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
    # colour jitter (fast-reid's INPUT.CJ, torchvision's ColorJitter): its probability, and the strength of each of
    # brightness, contrast, saturation (factors drawn from [max(0, 1 - s), 1 + s]) and hue (a shift from [-s, s] of
    # the colour circle), applied in a random order per image
    jitter: float = 0.0
    jitter_strength: tuple[float, float, float, float] = (0.15, 0.15, 0.1, 0.1)

    @property
    def draws(self) -> int:
        """Uniform numbers one image's augmentation takes: the jitter's only when it is on, so that runs without
        it draw the same numbers as before it existed."""
        return AUGMENT_DRAWS + (JITTER_DRAWS if self.jitter > 0 else 0)

    def validate(self) -> AugmentConfig:
        for flag, p in (("flip-prob", self.flip), ("erase-prob", self.erase), ("jitter-prob", self.jitter)):
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
        shown = ",".join(f"{v:g}" for v in self.jitter_strength)
        if len(self.jitter_strength) != 4 or min(self.jitter_strength) < 0:
            raise ConfigError(
                f"--jitter {shown}: give four strengths of 0 or more, brightness,contrast,saturation,hue (e.g. "
                "0.15,0.15,0.1,0.1)"
            )
        if self.jitter > 0 and max(self.jitter_strength) == 0:
            raise ConfigError(f"--jitter-prob {self.jitter:g} with --jitter {shown} changes no image; give a strength")
        if self.jitter_strength[3] > 0.5:
            raise ConfigError(f"--jitter {shown}: the hue's strength is at most 0.5 (half the colour circle)")
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


def parse_jitter(text: str) -> tuple[float, float, float, float]:
    """``'0.15,0.15,0.1,0.1'`` → the colour jitter's strengths: brightness, contrast, saturation, hue."""
    try:
        values = tuple(float(v) for v in text.split(","))
        if len(values) != 4:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"--jitter {text!r} must be four comma-separated strengths, brightness,contrast,saturation,hue (e.g. "
            "0.15,0.15,0.1,0.1)"
        ) from None
    return values


# the AugmentConfig fields given as text on the command line (and in `ablate --vary`), with their parsers
AUGMENT_PARSERS = {"erase_area": parse_erase_area, "jitter_strength": parse_jitter}


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, 1, H, W) luma, ITU-R 601-2 as torchvision's ``rgb_to_grayscale``."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue turned by ``shift`` (B, 1, 1, 1) of the colour circle: RGB → HSV, shift, → RGB (value and
    saturation kept), as torchvision's ``adjust_hue``."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)  # chroma, v·s
    # hue in sixths of the circle from the largest channel; a grey pixel (c = 0) has numerator 0 and keeps its grey
    h = torch.where(v == r, g - b, torch.where(v == g, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    h = h.div_(c.clamp_min(1e-12)).div_(6).add_(shift[:, 0]).remainder_(1.0)
    # HSV → RGB, channel n = 5, 3, 1 for R, G, B: v − c·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    k = (n + 6 * h.unsqueeze(1)).remainder_(6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(
    x: torch.Tensor, cfg: AugmentConfig, r: torch.Tensor, static_shapes: bool | None = None
) -> torch.Tensor:
    """Colour jitter of float (B, 3, H, W) images in [0, 1], as torchvision's ``ColorJitter`` applied with probability
    ``cfg.jitter`` (fast-reid's ``INPUT.CJ``), per image: the four operations in a random order, each with its own
    random factor. ``r`` (B, JITTER_DRAWS) uniform in [0, 1).

    ``static_shapes`` (the default on CUDA): every operation runs on the whole batch and each image keeps its own
    result (no shape depends on the draws, so the step can be one CUDA graph); else (the default on CPU, about 4x
    faster there at probability 0.5) each runs only on the images that take it, on a copy of ``x``. Both give the
    same images."""
    static_shapes = x.is_cuda if static_shapes is None else static_shapes
    if not static_shapes:
        x = x.clone()  # written row by row below
    on = r[:, 0] < cfg.jitter
    sb, sc, ss, sh = cfg.jitter_strength
    factors = [max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * r[:, 1 + i] for i, s in enumerate((sb, sc, ss))]
    factors.append(sh * (2 * r[:, 4] - 1))
    ops = [
        lambda y, f: _blend(y, 0.0, f),  # brightness: towards black
        lambda y, f: _blend(y, _gray(y).mean((1, 2, 3), keepdim=True), f),  # contrast: towards the mean grey
        lambda y, f: _blend(y, _gray(y), f),  # saturation: towards the image's grey
        _shift_hue,
    ]
    order = r[:, 5:9].argsort(1)  # a random permutation of the four per image
    active = [i for i, s in enumerate(cfg.jitter_strength) if s > 0]
    for position in range(4):
        for i in active:
            chosen = on & (order[:, position] == i)
            f = factors[i][:, None, None, None]
            if static_shapes:
                x = torch.where(chosen[:, None, None, None], ops[i](x, f), x)
            else:
                rows = chosen.nonzero().squeeze(1)
                x[rows] = ops[i](x[rows], f[rows])
    return x


def normalize_batch(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) with mean = std = 0.5."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def augment_batch(
    images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None, r: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device → augmented, normalised float (B, 3, H, W) on the same device.

    Random numbers: ``r`` (B, cfg.draws) uniform in [0, 1) already on the images' device (the trainer draws a
    whole epoch's at once, so a step copies nothing from the host), else one draw from ``gen`` (a CPU generator, so
    runs are reproducible across devices).
    """
    b, h, w, _ = images.shape
    dev = images.device
    if r is None:
        r = torch.rand(b, cfg.draws, generator=gen).to(dev)
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
    if cfg.jitter > 0:  # on the flipped, padded and cropped image in [0, 1] (black border included), as fast-reid
        x = color_jitter(x.add(1).mul_(0.5), cfg, r[:, AUGMENT_DRAWS:]).mul_(2).sub_(1)
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
