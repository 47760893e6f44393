"""Synthetic pedestrians written in the exact Market-1501 folder layout and naming.

Every identity is a procedurally drawn person (proportions, hair, clothes colours and patterns, shoes, bag, hat);
every camera has its own background, illumination, colour cast, blur, scale and detector misalignment. Identities
come in *mirrored pairs* that share their colours with top and bottom swapped, so a model that ignores where
a colour sits on the body (no positional encoding) confuses the two: the spatial layout of parts matters.

Everything is deterministic by seed: each image draws from its own generator seeded by
``(seed, pid, camera, index)``, so the output does not depend on generation order.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from reidcli.errors import ConfigError

__all__ = ["SyntheticConfig", "generate_synthetic", "draw_person", "IMAGE_HW", "MARKER"]

log = logging.getLogger(__name__)

IMAGE_HW = (128, 64)  # Market-1501 crops
MARKER = "synthetic.json"  # in the root: the options that drew it, so a rerun with the same ones reuses the folder
GENERATOR_VERSION = 1  # raise when the drawing changes: folders drawn before are then drawn again, not reused
PALETTE = np.array(
    [
        [200, 30, 30], [30, 60, 190], [30, 150, 50], [230, 200, 40], [240, 240, 240], [25, 25, 25],
        [130, 60, 160], [240, 130, 30], [120, 120, 120], [90, 50, 20], [40, 190, 200], [230, 120, 170],
    ],
    dtype=np.float32,
)  # fmt: skip
SKIN = np.array([[250, 215, 180], [225, 180, 140], [180, 130, 90], [120, 80, 50]], dtype=np.float32)
HAIR = np.array([[20, 15, 10], [90, 60, 30], [200, 170, 90], [140, 140, 140], [120, 30, 20]], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticConfig:
    num_train_ids: int = 100
    num_test_ids: int = 100
    num_cameras: int = 6
    images_per_camera: int = 3  # gallery images per (identity, camera) it appears in
    difficulty: float = 0.3  # 0 easy … 1 hard: misalignment, occlusion, lighting, colour cast, blur
    num_distractors: int = 50  # pid 0000 in the gallery
    num_junk: int = 20  # pid -1 in the gallery
    seed: int = 0

    def to_dict(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **asdict(self)}

    def validate(self) -> None:
        if self.num_train_ids < 2 or self.num_test_ids < 2:
            raise ConfigError("synthetic data needs at least 2 train and 2 test identities; raise --ids")
        if not 2 <= self.num_cameras <= 9:
            raise ConfigError("--cameras must be between 2 and 9 (Market-1501 naming has one digit)")
        if self.images_per_camera < 1:
            raise ConfigError("--images-per-camera must be at least 1")
        if self.num_distractors < 0 or self.num_junk < 0:
            raise ConfigError("--distractors and --junk cannot be negative (0: none)")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ConfigError("--difficulty must be between 0 and 1")


@dataclass(frozen=True)
class Identity:
    skin: np.ndarray
    hair: np.ndarray
    hair_long: bool
    top: np.ndarray
    bottom: np.ndarray
    accent: np.ndarray  # stripe / check colour
    top_pattern: int  # 0 plain, 1 horizontal stripes, 2 vertical stripes, 3 checks
    bottom_kind: int  # 0 trousers, 1 shorts, 2 skirt
    shoes: np.ndarray
    bag: int  # 0 none, 1 backpack, 2 shoulder bag
    bag_colour: np.ndarray
    hat: bool
    height: float  # fraction of the crop height
    width: float  # shoulder width in pixels at scale 1
    torso: float  # torso share of the body below the head


def make_identity(seed: int, pid: int) -> Identity:
    """Identities 2k and 2k+1 share colours with top and bottom swapped (the mirrored pair)."""
    base = pid - (pid % 2)
    rng = np.random.default_rng([seed, 7919, base])
    c_top, c_bottom, c_accent = rng.choice(len(PALETTE), size=3, replace=False)
    if pid % 2:
        c_top, c_bottom = c_bottom, c_top
    own = np.random.default_rng([seed, 104729, pid])
    return Identity(
        skin=SKIN[rng.integers(len(SKIN))],
        hair=HAIR[rng.integers(len(HAIR))],
        hair_long=bool(own.random() < 0.4),
        top=PALETTE[c_top],
        bottom=PALETTE[c_bottom],
        accent=PALETTE[c_accent],
        top_pattern=int(own.integers(4)),
        bottom_kind=int(own.choice(3, p=[0.6, 0.25, 0.15])),
        shoes=PALETTE[own.integers(len(PALETTE))] * 0.6,
        bag=int(own.choice(3, p=[0.5, 0.3, 0.2])),
        bag_colour=PALETTE[own.integers(len(PALETTE))] * 0.8,
        hat=bool(own.random() < 0.2),
        height=float(own.uniform(0.80, 0.92)),
        width=float(own.uniform(15.0, 21.0)),
        torso=float(own.uniform(0.36, 0.46)),
    )


def _camera_style(seed: int, cam: int, difficulty: float) -> dict:
    """A camera's look; colour cast and gain grow with the difficulty (colour constancy is what is hard)."""
    rng = np.random.default_rng([seed, 31337, cam])
    strength = 0.25 + 0.75 * difficulty
    return {
        "bg_top": rng.uniform(40, 220, 3),
        "bg_bottom": rng.uniform(40, 220, 3),
        "cast": 1.0 + strength * rng.uniform(-0.2, 0.2, 3),
        "gain": 1.0 + strength * rng.uniform(-0.25, 0.2),
        "blur": rng.uniform(0.0, 1.0),
        "scale": rng.uniform(0.9, 1.05),
        "texture": rng.uniform(5, 25),
    }


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _box(yy, xx, y0, y1, x0, x1):
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def draw_person(ident: Identity, rng: np.random.Generator, style: dict, difficulty: float) -> np.ndarray:
    """One 128×64 RGB uint8 crop of ``ident`` seen by a camera of ``style``."""
    h, w = IMAGE_HW
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = yy[..., None] / h
    img = style["bg_top"] * (1 - grad) + style["bg_bottom"] * grad
    img = img + rng.normal(0, style["texture"], (h, w, 1)) * (0.5 + difficulty)

    scale = style["scale"] * rng.uniform(1 - 0.12 * difficulty, 1 + 0.05 * difficulty)
    height = ident.height * h * scale
    top = (h - height) / 2 + rng.uniform(-1, 1) * 10 * difficulty
    cx = w / 2 + rng.uniform(-1, 1) * 8 * difficulty
    view = int(rng.integers(3))  # 0 front, 1 back, 2 side
    half = ident.width * scale / 2 * (0.7 if view == 2 else 1.0)

    head_r = height * 0.075
    head_cy = top + head_r
    neck = top + 2 * head_r
    torso_end = neck + (height - 2 * head_r) * ident.torso
    hip_end = torso_end + height * 0.05
    foot = top + height
    swing = rng.uniform(-1, 1) * 3

    parts: list[tuple[np.ndarray, np.ndarray]] = []
    # legs / bottom garment
    leg_w = half * 0.42
    for side in (-1, 1):
        lx = cx + side * (half * 0.45) + side * swing * 0.5
        leg = _box(yy, xx, torso_end, foot - 3, lx - leg_w / 2, lx + leg_w / 2)
        parts.append((leg, ident.skin))
        if ident.bottom_kind == 0:
            parts.append((leg, ident.bottom))
        elif ident.bottom_kind == 1:
            parts.append((leg & (yy < torso_end + (foot - torso_end) * 0.45), ident.bottom))
        parts.append((_box(yy, xx, foot - 4, foot, lx - leg_w / 2 - 1, lx + leg_w / 2 + 2), ident.shoes))
    if ident.bottom_kind == 2:
        skirt_end = torso_end + (foot - torso_end) * 0.5
        spread = half * (1 + 0.35 * (yy - torso_end) / max(skirt_end - torso_end, 1))
        parts.append((_box(yy, xx, torso_end, skirt_end, -1e9, 1e9) & (np.abs(xx - cx) < spread), ident.bottom))
    parts.append((_box(yy, xx, torso_end, hip_end, cx - half, cx + half), ident.bottom))

    # arms then torso (torso drawn over arms)
    arm_w = half * 0.32
    for side in (-1, 1):
        ax = cx + side * (half + arm_w / 2 - 1)
        arm = _box(yy, xx, neck + 1, torso_end + height * 0.08 + side * swing, ax - arm_w / 2, ax + arm_w / 2)
        parts.append((arm, ident.top))
        parts.append((arm & (yy > torso_end + height * 0.02 + side * swing), ident.skin))
    torso = _box(yy, xx, neck, torso_end, cx - half, cx + half)
    parts.append((torso, ident.top))
    if ident.top_pattern == 1:
        parts.append((torso & (((yy - neck) // 4) % 2 == 1), ident.accent))
    elif ident.top_pattern == 2:
        parts.append((torso & (((xx - cx + 64) // 3) % 2 == 1), ident.accent))
    elif ident.top_pattern == 3:
        parts.append((torso & ((((yy - neck) // 4) + ((xx - cx + 64) // 4)) % 2 == 1), ident.accent))
    if view == 0:  # front: a small emblem on the chest
        parts.append((_box(yy, xx, neck + 3, neck + 7, cx - 2, cx + 2), ident.accent * 0.5 + 100))

    # bags: a backpack is seen whole from the back, as a strap from the front; a shoulder bag hangs on one side
    if ident.bag == 1:
        if view == 1:
            parts.append((_box(yy, xx, neck + 2, torso_end - 2, cx - half * 0.7, cx + half * 0.7), ident.bag_colour))
        else:
            parts.append((_box(yy, xx, neck, torso_end, cx + half * 0.45, cx + half * 0.65), ident.bag_colour))
    elif ident.bag == 2:
        bx = cx + (half + 2 if view != 1 else -half - 2)
        parts.append((_box(yy, xx, torso_end - 6, torso_end + 6, bx - 4, bx + 4), ident.bag_colour))

    # head, hair, hat
    parts.append((_ellipse(yy, xx, head_cy, cx, head_r, head_r * 0.85), ident.skin))
    hair_cut = head_cy + (head_r * 1.6 if ident.hair_long else 0.0) if view == 1 else head_cy - head_r * 0.2
    hair = _ellipse(yy, xx, head_cy - 1, cx, head_r * 1.1, head_r * 0.95) & (yy < hair_cut)
    if ident.hair_long:
        hair |= _box(yy, xx, head_cy, head_cy + head_r * 2.2, cx - head_r, cx + head_r) & ~torso
        if view == 0:
            hair &= ~_ellipse(yy, xx, head_cy + 1, cx, head_r * 0.8, head_r * 0.6)
    parts.append((hair, ident.hair))
    if ident.hat:
        parts.append(
            (_box(yy, xx, top - 2, head_cy - head_r * 0.2, cx - head_r * 1.2, cx + head_r * 1.2), ident.accent)
        )

    for mask, colour in parts:
        img[mask] = colour
    img = img * style["cast"] * style["gain"] * rng.uniform(1 - 0.25 * difficulty, 1 + 0.15 * difficulty)
    img = img + rng.normal(0, 3 + 6 * difficulty, img.shape)

    if rng.random() < 0.3 * difficulty:  # partial occlusion by a passer-by or an object
        oh = int(rng.uniform(0.15, 0.35) * h)
        oy = int(rng.uniform(0.3, 1.0) * (h - oh))
        ow = int(rng.uniform(0.3, 0.6) * w)
        ox = 0 if rng.random() < 0.5 else w - ow
        img[oy : oy + oh, ox : ox + ow] = rng.uniform(30, 220, 3)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    sigma = style["blur"] * difficulty + rng.uniform(0, 0.4)
    if sigma > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(out)


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    prefix = "-1" if pid < 0 else f"{pid:04d}"
    return f"{prefix}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"


def _image(cfg: SyntheticConfig, pid: int, cam: int, k: int, ident: Identity | None = None) -> bytes:
    rng = np.random.default_rng([cfg.seed, pid + 2, cam, k])
    if ident is None:  # junk / distractor: a random stranger, often badly cropped
        ident = make_identity(cfg.seed + 1_000_003, int(rng.integers(1 << 30)))
    arr = draw_person(ident, rng, _camera_style(cfg.seed, cam, cfg.difficulty), cfg.difficulty)
    if pid < 0:  # junk: mostly background, a sliver of a person
        cut = int(rng.integers(10, 40))
        arr = np.roll(arr, cut if rng.random() < 0.5 else -cut, axis=int(rng.integers(2)))
    return _jpeg(arr, int(rng.integers(75, 96)))


def _cameras_of(cfg: SyntheticConfig, pid: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 4242, pid])
    n = int(rng.integers(2, cfg.num_cameras + 1))
    return np.sort(rng.choice(cfg.num_cameras, size=n, replace=False))


def generate_synthetic(root: str | Path, cfg: SyntheticConfig) -> dict[str, int]:
    """Write ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` under ``root``; return file counts.

    Train identities get pids 1…T, test identities T+1…T+Q (as Market keeps train and test ids disjoint).
    Each test identity gives one query per camera it appears in, except its last camera (so every query has a
    match in another camera); its gallery holds ``images_per_camera`` images in every camera.
    """
    cfg.validate()
    root = Path(root)
    folders = {s: root / s for s in ("bounding_box_train", "query", "bounding_box_test")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(folders, 0)

    def put(split: str, pid: int, cam: int, k: int, data: bytes) -> None:
        (folders[split] / _name(pid, cam, 1 + k % 6, 100 * k + cam, 1 + k % 4)).write_bytes(data)
        counts[split] += 1

    for pid in range(1, cfg.num_train_ids + cfg.num_test_ids + 1):
        ident = make_identity(cfg.seed, pid)
        cams = _cameras_of(cfg, pid)
        is_test = pid > cfg.num_train_ids
        for cam in cams:
            for k in range(cfg.images_per_camera):
                put(
                    "bounding_box_test" if is_test else "bounding_box_train",
                    pid,
                    cam,
                    k,
                    _image(cfg, pid, cam, k, ident),
                )
            if is_test and cam != cams[-1]:
                k = cfg.images_per_camera
                put("query", pid, cam, k, _image(cfg, pid, cam, k, ident))
    for i in range(cfg.num_distractors):
        cam = i % cfg.num_cameras
        put("bounding_box_test", 0, cam, i, _image(cfg, 0, cam, i))
    for i in range(cfg.num_junk):
        cam = i % cfg.num_cameras
        put("bounding_box_test", -1, cam, i, _image(cfg, -1, cam, i))
    (root / MARKER).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    log.info("synthetic Market-1501 layout written to %s: %s", root, counts)
    return counts
