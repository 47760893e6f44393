"""ViT for person ReID whose positional encoding is a switch (``none|ape|sincos|rpe|both``), with a BNNeck head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from reidcli.errors import ConfigError
from reidcli.model.attention import Block
from reidcli.model.position import AbsolutePositionEmbedding, RelativePositionBias
from reidcli.onednn import Linear

__all__ = [
    "PE_CHOICES",
    "ID_HEADS",
    "HEAD_MARGINS",
    "CosineClassifier",
    "PRESETS",
    "ModelConfig",
    "ReIDOutput",
    "ViTReID",
    "build_model",
    "parameter_report",
    "flop_report",
    "check_cameras",
    "jpm_groups_index",
]

PE_CHOICES = ("none", "ape", "sincos", "rpe", "both")
ID_HEADS = ("linear", "cosface", "arcface", "circle")
HEAD_MARGINS = {"cosface": 0.35, "arcface": 0.5, "circle": 0.35}  # each cosine head's default margin (fast-reid's)
PRESETS = {
    "vit_tiny": {"dim": 192, "depth": 12, "heads": 3},
    "vit_small": {"dim": 384, "depth": 12, "heads": 6},
    "vit_base": {"dim": 768, "depth": 12, "heads": 12},
}


@dataclass(frozen=True)
class ModelConfig:
    pe: Literal["none", "ape", "sincos", "rpe", "both"] = "ape"
    image_size: tuple[int, int] = (256, 128)
    patch_size: int = 16
    stride: int = 16  # < patch_size gives TransReID's overlapping patches
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    num_classes: int = 0
    neck_feat: Literal["before", "after"] = "before"  # test feature: CLS before the BNNeck (TransReID) or after
    sie_cameras: int = 0  # > 0: TransReID's side-information (camera) embedding, one learnable vector per camera
    sie_weight: float = 3.0  # its coefficient (TransReID's λ = 3)
    jpm: bool = False  # TransReID's jigsaw patch module: local features from shifted, shuffled patch groups
    jpm_groups: int = 4  # local groups (TransReID's divide length)
    jpm_shift: int = 4  # patch tokens rolled by this many before the shuffle (TransReID's SHIFT_NUM 5 rolls by 4)
    jpm_shuffle: int = 2  # interleave factor of the patch shuffle
    # The ID classifier: linear (TransReID, bag of tricks), or cosine logits trained with a margin (fast-reid's
    # CosSoftmax, ArcSoftmax, CircleSoftmax): cosface, arcface, circle; scale and margin act in the CE loss.
    id_head: str = "linear"
    head_scale: float = 64.0
    head_margin: float = 0.35

    @property
    def feature_dim(self) -> int:
        """Width of the test feature: the global CLS, plus each JPM group's local feature."""
        return self.dim * (1 + self.jpm_groups) if self.jpm else self.dim

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.image_size
        return (h - self.patch_size) // self.stride + 1, (w - self.patch_size) // self.stride + 1

    def validate(self) -> ModelConfig:
        if self.pe not in PE_CHOICES:
            raise ConfigError(f"unknown --pe {self.pe!r}; choose one of {', '.join(PE_CHOICES)}")
        sizes = {"dim": self.dim, "depth": self.depth, "heads": self.heads, "patch-size": self.patch_size}
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0 < self.stride <= self.patch_size:
            raise ConfigError(f"--stride must be between 1 and the patch size {self.patch_size}, got {self.stride}")
        if min(self.image_size) < self.patch_size:
            raise ConfigError(f"--image-size {self.image_size} is smaller than one {self.patch_size}px patch")
        if self.dim % self.heads:
            raise ConfigError(f"--dim {self.dim} must be divisible by --heads {self.heads}")
        if self.pe == "sincos" and self.dim % 4:
            raise ConfigError(f"--pe sincos needs --dim divisible by 4, got {self.dim}")
        if self.neck_feat not in ("before", "after"):
            raise ConfigError("--neck-feat must be 'before' or 'after'")
        if self.jpm:
            patches = self.grid[0] * self.grid[1]
            if not 1 <= self.jpm_groups <= patches or self.jpm_shuffle < 1 or self.jpm_shift < 0:
                raise ConfigError(
                    f"--jpm-groups {self.jpm_groups} must be between 1 and the {patches} patches, --jpm-shuffle at "
                    f"least 1 and --jpm-shift at least 0 (got {self.jpm_shuffle}, {self.jpm_shift})"
                )
        if self.id_head not in ID_HEADS:
            raise ConfigError(f"unknown --id-head {self.id_head!r}; choose one of {', '.join(ID_HEADS)}")
        if self.head_scale <= 0 or not 0 <= self.head_margin < 1:
            raise ConfigError(
                f"--head-scale {self.head_scale} must be positive and --head-margin {self.head_margin} in [0, 1)"
            )
        if self.sie_cameras < 0 or self.sie_weight < 0:
            raise ConfigError(
                f"SIE needs a camera count ≥ 0 and --sie-weight ≥ 0, got {self.sie_cameras} and {self.sie_weight}"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(cls(**PRESETS[name]), **{k: v for k, v in overrides.items() if v is not None})


class ReIDOutput(NamedTuple):
    feat: torch.Tensor  # (B, D) CLS embedding before the BNNeck
    logits: torch.Tensor | None  # (B, classes) from the BN feature; None without a classifier
    tokens: torch.Tensor | None  # (B, N, D) patch tokens after the final norm; None when the forward skipped them
    local_feat: torch.Tensor | None = None  # (B, G, D) JPM's local CLS features before their BNNecks
    local_logits: torch.Tensor | None = None  # (B, G, classes) from their BN features


class PatchEmbed(nn.Module):
    """Conv patchifier with its own stride (overlapping patches when stride < patch); timm's key names."""

    def __init__(self, patch: int, stride: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class CosineClassifier(nn.Module):
    """Cosine similarities of the (BN) feature to one learned vector per identity: the logits of a margin head before
    its scale and margin (applied by the CE loss, which knows the labels). Same ``weight`` key as the linear one."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def _classifier(cfg: ModelConfig) -> nn.Module:
    if cfg.id_head == "linear":
        return Linear(cfg.dim, cfg.num_classes, bias=False)
    return CosineClassifier(cfg.dim, cfg.num_classes)


class ViTReID(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        grid, dim = cfg.grid, cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.stride, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = None
        if cfg.pe in ("ape", "both", "sincos"):
            self.pos = AbsolutePositionEmbedding(grid, dim, learnable=cfg.pe != "sincos")
        self.rel_pos = None
        if cfg.pe in ("rpe", "both"):
            self.rel_pos = nn.ModuleList(RelativePositionBias(grid, cfg.heads) for _ in range(cfg.depth))
        self.sie_embed = None  # (cameras, 1, D), added to every token (TransReID's SIE)
        if cfg.sie_cameras:
            self.sie_embed = nn.Parameter(torch.zeros(cfg.sie_cameras, 1, dim))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: the shift stays zero
        self.classifier = _classifier(cfg) if cfg.num_classes else None
        if cfg.jpm:
            self._build_jpm()
        self._init_weights()
        if cfg.jpm:
            self.sync_jpm()

    def _build_jpm(self) -> None:
        """The jigsaw patch module's own copy of the last block (and of its norm and relative-position table), and a
        BNNeck and classifier per group. Each group's tokens: the CLS token and a fixed subset of the patch tokens
        entering the last block, after a roll by ``jpm_shift`` and an interleaving shuffle (TransReID)."""
        cfg = self.cfg
        self.jpm_block = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, 0.0)
        self.jpm_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.jpm_rel_pos = RelativePositionBias(cfg.grid, cfg.heads) if self.rel_pos is not None else None
        self.jpm_bottlenecks = nn.ModuleList(nn.BatchNorm1d(cfg.dim) for _ in range(cfg.jpm_groups))
        for bn in self.jpm_bottlenecks:
            bn.bias.requires_grad_(False)
        self.jpm_classifiers = (
            nn.ModuleList(_classifier(cfg) for _ in range(cfg.jpm_groups)) if cfg.num_classes else None
        )
        patches = jpm_groups_index(cfg)  # each group's token indices in the sequence, CLS (0) first
        tokens = torch.cat([patches.new_zeros(len(patches), 1), patches + 1], dim=1)
        self.register_buffer("jpm_tokens", tokens, persistent=False)

    @torch.no_grad()
    def sync_jpm(self) -> None:
        """Start the JPM branch as a copy of the last block, its norm and relative-position table (TransReID copies
        the pretrained last layer): called when the model is built and after initial weights are loaded."""
        if not self.cfg.jpm:
            return
        self.jpm_block.load_state_dict(self.blocks[-1].state_dict())
        self.jpm_norm.load_state_dict(self.norm.state_dict())
        if self.jpm_rel_pos is not None:
            self.jpm_rel_pos.load_state_dict(self.rel_pos[-1].state_dict())

    def _jpm_local(self, last_in: torch.Tensor) -> torch.Tensor:
        """(B, G, D) local CLS features from the tokens entering the last block."""
        b, _, d = last_in.shape
        sel = self.jpm_tokens  # (G, L+1)
        tokens = last_in[:, sel].flatten(0, 1)  # (B·G, L+1, D)
        bias = None
        if self.jpm_rel_pos is not None:  # each group's pairs, looked up in the full (heads, N+1, N+1) bias
            full = self.jpm_rel_pos()
            per_group = full[:, sel[:, :, None], sel[:, None, :]].permute(1, 0, 2, 3)  # (G, heads, L+1, L+1)
            bias = per_group.unsqueeze(0).expand(b, -1, -1, -1, -1).flatten(0, 1)
        out = self.jpm_norm(self.jpm_block(tokens, bias, cls_only=True))[:, 0]  # each group's CLS output alone
        return out.view(b, len(sel), d)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        if self.sie_embed is not None:
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
        for clf in getattr(self, "jpm_classifiers", None) or ():
            nn.init.normal_(clf.weight, std=0.001)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)

    def forward_features(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) normalised → (B, N+1, D) tokens after the final norm. ``camids`` (B,) int64: each image's
        camera (0-based), which a model with camera embeddings (``sie_cameras``) needs and any other ignores."""
        return self._encode(x, camids)[0]

    def _encode(
        self, x: torch.Tensor, camids: torch.Tensor | None, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens after the final norm, and the tokens entering the last block (the JPM branch's input).

        ``cls_only``: the CLS token alone after the final norm, (B, 1, D). In the last block the patch tokens'
        outputs feed nothing but themselves, so after every token's qkv it computes the CLS query's attention row,
        projection and MLP only: ViT-B/16 at 256×128 (129 tokens) does ~6% fewer products, the demo's 4-block
        model ~17%."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos is not None:
            x = self.pos(x)
        if self.sie_embed is not None:
            if camids is None:
                raise ConfigError(
                    "this model embeds each image's camera (SIE): pass the images' camera ids (0-based, as the "
                    "dataset and features files store them)"
                )
            x = x + self.cfg.sie_weight * self.sie_embed[camids]
        biases = [r() for r in self.rel_pos] if self.rel_pos is not None else [None] * len(self.blocks)
        for block, bias in zip(self.blocks[:-1], biases[:-1], strict=True):
            x = block(x, bias)
        return self.norm(self.blocks[-1](x, biases[-1], cls_only)), x

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None = None, patches: bool = True) -> ReIDOutput:
        """``patches=False``: the patch tokens are not formed (``tokens`` None), for losses that read the CLS
        feature alone (the last block runs for the CLS token only); the features and logits are the same."""
        tokens, entering = self._encode(x, camids, cls_only=not patches)
        feat = tokens[:, 0]
        tokens = tokens[:, 1:] if patches else None
        logits = self.classifier(self.bottleneck(feat)) if self.classifier is not None else None
        if not self.cfg.jpm:
            return ReIDOutput(feat, logits, tokens)
        local = self._jpm_local(entering)
        local_logits = None
        if self.jpm_classifiers is not None:
            heads = zip(self.jpm_bottlenecks, self.jpm_classifiers, strict=True)
            local_logits = torch.stack([clf(bn(local[:, g])) for g, (bn, clf) in enumerate(heads)], dim=1)
        return ReIDOutput(feat, logits, tokens, local, local_logits)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, flip: bool = False, camids: torch.Tensor | None = None) -> torch.Tensor:
        """Test features (B, D), L2-normalised; ``flip`` averages with the horizontal mirror; ``camids``: as in
        :meth:`forward_features`."""
        if flip:  # image and mirror in one batch: one pass of larger, more efficient kernels
            both = None if camids is None else torch.cat([camids, camids])
            feat = self._test_feature(torch.cat([x, x.flip(3)]), both).float()
            feat = feat[: x.shape[0]] + feat[x.shape[0] :]  # x.shape, not len(x): symbolic when exported
        else:
            feat = self._test_feature(x, camids).float()
        return F.normalize(feat, dim=1)

    @property
    def uses_cameras(self) -> bool:
        """Whether the forward needs each image's camera id (TransReID's SIE)."""
        return self.sie_embed is not None

    def _test_feature(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """The CLS feature before (or after) the BNNeck; with JPM the group features follow it, each divided by the
        number of groups (TransReID)."""
        tokens, entering = self._encode(x, camids, cls_only=True)
        after = self.cfg.neck_feat == "after"
        feat = self.bottleneck(tokens[:, 0]) if after else tokens[:, 0]
        if not self.cfg.jpm:
            return feat
        local = self._jpm_local(entering)
        if after:
            local = torch.stack([bn(local[:, g]) for g, bn in enumerate(self.jpm_bottlenecks)], dim=1)
        return torch.cat([feat, local.flatten(1) / self.cfg.jpm_groups], dim=1)

    def positional_relation(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``r(a,b) = ⟨P_a, P_b⟩ + mean over layers and heads of B[idx(a,b)]`` for patch indices a, b (any shape).

        The APE term is absent for ``rpe``/``none`` and the RPE term for ``ape``/``sincos``.
        """
        rel = torch.zeros(a.shape, device=a.device)
        if self.pos is not None:
            p = self.pos.patch_embeddings()  # (N, D)
            rel = rel + (p[a] * p[b]).sum(-1)
        if self.rel_pos is not None:
            tables = torch.stack([r.relative_position_bias_table for r in self.rel_pos])  # (L, T+3, heads)
            mean_bias = tables.mean(dim=(0, 2))  # (T+3,)
            index = self.rel_pos[0].relative_position_index
            rel = rel + mean_bias[index[a + 1, b + 1]]
        return rel

    HEAD_MODULES = ("bottleneck", "classifier", "jpm_bottlenecks", "jpm_classifiers")

    def freeze_backbone(self, frozen: bool) -> None:
        """Train the head alone (``frozen``): every module but the BNNecks and ID classifiers stops learning and runs
        in eval mode (no DropPath), as torchreid's ``open_specified_layers`` and fast-reid's layer freezing do;
        ``False`` gives the backbone its gradients back (call it after ``train()``, which resets the modes).
        Parameters that never learn (the BNNecks' shift, a sin-cos table) stay as they are."""
        if not hasattr(self, "_learning"):  # the backbone parameters that learn, as built
            self._learning = [
                p for n, p in self.named_parameters() if p.requires_grad and n.split(".")[0] not in self.HEAD_MODULES
            ]
        for p in self._learning:
            p.requires_grad_(not frozen)
        if frozen:
            for name, module in self.named_children():
                if name not in self.HEAD_MODULES:
                    module.eval()

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: position tables, CLS token (biases and norms by rule)."""
        names = {"cls_token"} | ({"sie_embed"} if self.sie_embed is not None else set())
        names |= {n for n, _ in self.named_parameters() if "pos_embed" in n or "relative_position_bias_table" in n}
        return names


def build_model(cfg: ModelConfig) -> ViTReID:
    return ViTReID(cfg)


def parameter_report(model: ViTReID) -> dict[str, float | int]:
    """Totals and the shares taken by APE ((N+1)·D) and RPE (layers·heads·((2H−1)(2W−1)+3)); the camera embedding
    (SIE: cameras·D) when the model has one."""
    total = sum(p.numel() for p in model.parameters())
    ape = model.pos.pos_embed.numel() if model.pos is not None and model.cfg.pe != "sincos" else 0
    rpe = sum(r.relative_position_bias_table.numel() for r in model.rel_pos) if model.rel_pos is not None else 0
    return {
        "total": total,
        "ape": ape,
        "rpe": rpe,
        "pe": ape + rpe,
        "pe_share": (ape + rpe) / total if total else math.nan,
        "grid": list(model.cfg.grid),
        **({"sie": model.sie_embed.numel()} if model.sie_embed is not None else {}),
        **(
            {"jpm": sum(p.numel() for n, p in model.named_parameters() if n.startswith("jpm_"))}
            if model.cfg.jpm
            else {}
        ),
        "feature_dim": model.cfg.feature_dim,
    }


def flop_report(model: ViTReID, patches: bool = False) -> dict[str, float]:
    """Matrix-product FLOPs per image (a multiply-add counts 2, as torch's ``FlopCounterMode``): the test-time
    forward (``reid extract``'s flip averaging doubles it) and one training step (forward + backward; ``patches``:
    with a loss that reads the patch tokens, so the last block runs for every token), counted on a copy of the model
    on the meta device: shapes only, no memory, no arithmetic."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, 3, *model.cfg.image_size, device="meta")
    cams = torch.zeros(1, dtype=torch.long, device="meta") if model.uses_cameras else None
    meta.eval()
    with FlopCounterMode(display=False) as forward:
        meta._test_feature(x, cams)
    meta.train()
    with FlopCounterMode(display=False) as step:
        out = meta(x, cams, patches=patches)
        loss = out.feat.sum() + (out.logits.sum() if out.logits is not None else 0)
        loss.backward()
    return {"forward_gflop": forward.get_total_flops() / 1e9, "train_gflop": step.get_total_flops() / 1e9}


def check_cameras(cfg: ModelConfig, camids, what: str) -> None:
    """That a model with camera embeddings (SIE) has one for every camera id in ``camids`` (any int array);
    nothing to check for other models."""
    import numpy as np

    camids = np.asarray(camids)
    if cfg.sie_cameras and len(camids) and (int(camids.max()) >= cfg.sie_cameras or int(camids.min()) < 0):
        bad = int(camids.max()) if int(camids.min()) >= 0 else int(camids.min())
        raise ConfigError(
            f"the model embeds {cfg.sie_cameras} cameras (SIE, ids 0–{cfg.sie_cameras - 1}) but camera {bad} is in "
            f"{what}; its cameras must be among the training dataset's"
        )


def jpm_groups_index(cfg: ModelConfig) -> torch.Tensor:
    """(G, L) patch indices of each JPM group: the patches rolled by ``jpm_shift``, then interleaved by a shuffle of
    ``jpm_shuffle`` (a view as (shuffle, N/shuffle), transposed; a patch count that does not divide is padded by
    repeating the second-to-last entry, as TransReID pads), then cut into G groups of L = ⌊N/G⌋ consecutive
    entries (N the patch count before the padding, as TransReID's ``patch_length``)."""
    n = cfg.grid[0] * cfg.grid[1]
    order = torch.roll(torch.arange(n), -cfg.jpm_shift)
    pad = -n % cfg.jpm_shuffle
    order = torch.cat([order, order[-2:-1].expand(pad) if n > 1 else order[-1:].expand(pad)])
    order = order.view(cfg.jpm_shuffle, -1).t().flatten()
    size = n // cfg.jpm_groups
    return order[: size * cfg.jpm_groups].view(cfg.jpm_groups, size).clone()
