"""``--loss`` specs (``ce+triplet+rp-triplet``) and the weighted sum of their components."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reidcli.errors import ConfigError
from reidcli.losses.positional import patch_embedding, relation_vectors, rp_triplet
from reidcli.losses.triplet import batch_hard_triplet

__all__ = [
    "LOSS_NAMES",
    "PATCH_LOSSES",
    "LossConfig",
    "parse_loss_spec",
    "compute_losses",
    "center_loss",
    "margin_logits",
]

LOSS_NAMES = ("ce", "triplet", "center", "patch-triplet", "rp-triplet")
PATCH_LOSSES = frozenset({"patch-triplet", "rp-triplet"})  # the losses on the patch tokens


def parse_loss_spec(spec: str) -> tuple[str, ...]:
    """``'rp-triplet'`` → ``('ce', 'triplet', 'rp-triplet')``: a patch-level loss alone implies the global ones."""
    names = [s.strip() for s in spec.split("+") if s.strip()]
    unknown = [n for n in names if n not in LOSS_NAMES]
    if unknown or not names:
        raise ConfigError(
            f"unknown loss {unknown[0] if unknown else spec!r}; use a '+'-joined list of "
            f"{', '.join(LOSS_NAMES)} (e.g. ce+triplet+rp-triplet)"
        )
    if all(n in ("patch-triplet", "rp-triplet") for n in names):
        names = ["ce", "triplet", *names]
    if "center" in names and not {"ce", "triplet"} & set(names):
        raise ConfigError(
            f"--loss {spec}: the center loss only pulls features to their identity's centre (alone, every feature "
            "collapses onto it); join it to ce or triplet, e.g. ce+triplet+center"
        )
    return tuple(n for n in LOSS_NAMES if n in names)


@dataclass(frozen=True)
class LossConfig:
    spec: str = "ce+triplet"
    label_smoothing: float = 0.0
    margin: float | None = None  # None: soft margin (TransReID's default)
    ce_weight: float = 1.0
    triplet_weight: float = 1.0
    patch_weight: float = 1.0
    rp_weight: float = 1.0
    top_n: int = 8  # patches kept by the patch / RP triplet
    rp_form: str = "stable"  # or "raw", the seed's form
    rp_warmup_epochs: int = 5  # RP weight ramps linearly from 0 over these epochs (stable form)
    center_weight: float = 0.0005  # TransReID's CENTER_LOSS_WEIGHT
    center_lr: float = 0.5  # the centres' own SGD step size, constant (TransReID's CENTER_LR)

    @property
    def names(self) -> tuple[str, ...]:
        return parse_loss_spec(self.spec)

    @property
    def reads_patches(self) -> bool:
        """Whether a loss reads the patch tokens after the last block; else the model's forward skips them (its last
        block runs for the CLS token alone)."""
        return bool(PATCH_LOSSES & set(self.names))

    def validate(self) -> LossConfig:
        self.names  # noqa: B018 — parses and raises on a bad spec
        if self.rp_form not in ("raw", "stable"):
            raise ConfigError("--rp-form must be 'raw' or 'stable'")
        if self.top_n < 2:
            raise ConfigError("--top-n must be at least 2 (the RP loss needs pairs of patches)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("--label-smoothing must be in [0, 1)")
        if self.margin is not None and self.margin <= 0:
            raise ConfigError(f"--margin {self.margin} must be positive (leave it out for the soft margin)")
        if self.center_lr <= 0:
            raise ConfigError(f"--center-lr {self.center_lr} must be positive (the centres' SGD step size)")
        weights = {"patch": self.patch_weight, "rp": self.rp_weight, "ce": self.ce_weight}
        weights |= {"triplet": self.triplet_weight, "center": self.center_weight}
        negative = [f"--{name}-weight {w}" for name, w in weights.items() if w < 0]
        if negative:
            raise ConfigError(f"{', '.join(negative)}: loss weights cannot be negative (0 turns a loss off)")
        return self


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, head: str, scale: float, margin: float) -> torch.Tensor:
    """The CE logits of a cosine head (``cos``: (B, classes) cosines) with its margin on the labelled class:

    - cosface (CosFace / AM-Softmax): ``s·(cos − m)`` for the label, ``s·cos`` for the others;
    - arcface (ArcFace): ``s·cos(θ + m)`` for the label (``s·(cos − m·sin m)`` once θ + m passes π, where
      ``cos(θ + m)`` would rise again), ``s·cos`` for the others;
    - circle (Circle loss, as fast-reid's CircleSoftmax): ``s·α_p·(cos − (1 − m))`` for the label with
      ``α_p = [1 + m − cos]₊``, and ``s·α_n·(cos − m)`` for the others with ``α_n = [cos + m]₊`` (α not
      differentiated);
    - linear: ``cos`` as given (the logits of a linear classifier)."""
    if head == "linear":
        return cos
    cos = cos.float()
    # a scatter, not F.one_hot, which may check the labels' range on the host (a sync a CUDA graph cannot capture)
    target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], True)
    if head == "cosface":
        return scale * (cos - margin * target)
    if head == "arcface":
        c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
        shifted = torch.cos(torch.acos(c) + margin)
        shifted = torch.where(c > math.cos(math.pi - margin), shifted, c - margin * math.sin(margin))
        return scale * torch.where(target, shifted, cos)
    if head == "circle":
        alpha_p = (1.0 + margin - cos).clamp_min(0.0).detach()
        alpha_n = (cos + margin).clamp_min(0.0).detach()
        return scale * torch.where(target, alpha_p * (cos - (1.0 - margin)), alpha_n * (cos - margin))
    raise ConfigError(f"unknown ID head {head!r}")


def center_loss(feat: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Center loss (Wen et al. 2016, as TransReID and reid-strong-baseline weigh it): the batch mean of the squared
    Euclidean distance ``‖f_i − c_{y_i}‖²`` of each feature to its identity's centre (``centers``: (classes, D)).
    In float32: squared distances of 768-wide features lose their small differences in bf16."""
    return (feat.float() - centers[labels].float()).pow(2).sum(1).mean()


def compute_losses(
    model,
    out,
    labels: torch.Tensor,
    cfg: LossConfig,
    epoch: float | torch.Tensor = 0.0,
    stats: dict | None = None,
    centers: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted components by name; their sum is the training loss. ``epoch`` (a number or a 0-d tensor) drives the
    RP weight warm-up; ``centers`` (classes, D) are the center loss's identity centres (the training loop owns and
    updates them).

    ``stats``, when given, receives detached diagnostics (the mean norm of the RP relation vectors).
    """
    names = cfg.names
    losses: dict[str, torch.Tensor] = {}
    local = getattr(out, "local_feat", None) is not None  # JPM: half global, half the mean over the groups
    if "ce" in names:
        if out.logits is None:
            raise ConfigError("the ce loss needs a classifier; build the model with num_classes > 0")

        head = model.cfg

        def ce(logits: torch.Tensor) -> torch.Tensor:
            logits = margin_logits(logits, labels, head.id_head, head.head_scale, head.head_margin)
            return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)

        value = ce(out.logits)
        if local:
            groups = out.local_logits.shape[1]
            value = 0.5 * value + 0.5 * sum(ce(out.local_logits[:, g]) for g in range(groups)) / groups
        losses["ce"] = cfg.ce_weight * value
    if "triplet" in names:
        value = batch_hard_triplet(out.feat, labels, cfg.margin)
        if local:
            groups = out.local_feat.shape[1]
            parts = sum(batch_hard_triplet(out.local_feat[:, g], labels, cfg.margin) for g in range(groups))
            value = 0.5 * value + 0.5 * parts / groups
        losses["triplet"] = cfg.triplet_weight * value
    if "center" in names:
        if centers is None:
            raise ConfigError("the center loss needs its identity centres; train it through reid train")
        losses["center"] = cfg.center_weight * center_loss(out.feat, labels, centers)  # the global feature only
    if "patch-triplet" in names:
        emb = patch_embedding(out.feat, out.tokens, cfg.top_n)
        losses["patch-triplet"] = cfg.patch_weight * batch_hard_triplet(emb, labels, cfg.margin)
    if "rp-triplet" in names:
        if cfg.rp_form == "raw" or cfg.rp_warmup_epochs <= 0:
            ramp = 1.0
        elif isinstance(epoch, torch.Tensor):  # a device scalar (CUDA-graph steps): no host sync
            ramp = (epoch / cfg.rp_warmup_epochs).clamp(max=1.0)
        else:
            ramp = min(1.0, epoch / cfg.rp_warmup_epochs)
        rel = relation_vectors(model, out.feat, out.tokens, cfg.top_n)
        if stats is not None:
            stats["rp_relation_norm"] = rel.detach().float().norm(dim=1).mean()
        losses["rp-triplet"] = cfg.rp_weight * ramp * rp_triplet(rel, labels, cfg.rp_form)
    return losses
