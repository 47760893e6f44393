"""The training loop: images held on the training device, PK batches, batched augmentation, resumable runs."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from reidcli.data.augment import AUGMENT_FLAGS, AugmentConfig, augment_batch
from reidcli.data.sampler import PKSampler
from reidcli.data.store import DatasetSplit, read_dataset, read_images
from reidcli.engine.checkpoint import (
    RunFiles,
    load_checkpoint,
    read_metrics,
    read_run_config,
    save_checkpoint,
    save_weights,
    write_json_atomic,
    write_metrics,
)
from reidcli.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    first_differing_replica,
    setup_distributed,
    teardown_distributed,
)
from reidcli.errors import ConfigError, FormatError, TrainingError
from reidcli.losses.combined import LossConfig, compute_losses
from reidcli.model.vit import ModelConfig, ViTReID, check_cameras, parameter_report
from reidcli.retrieval.evaluate import resolve_device

__all__ = [
    "COMPILE_MODES",
    "TRAIN_PRECISIONS",
    "TrainConfig",
    "TrainResult",
    "load_train_config",
    "lr_at",
    "train",
    "train_precision",
    "trajectory_changes",
]

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "step")
CURVES_EVERY_S = 60.0  # curves.png is redrawn during a run at most this often (a plot takes ~0.3 s), and at its end


def train_precision(precision: str, device: torch.device) -> str:
    """The step's precision: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU. bf16 on the CPU uses its bf16
    instructions where it has them: 1.4-1.65x fp32 for a ViT-S/16 step on the test machine's AVX-512 cores."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass(frozen=True)
class TrainConfig:
    data: str
    run_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    # more prepared datasets whose train splits join data's (identities and cameras kept apart); evaluation: data's
    extra_data: tuple[str, ...] = ()
    combine_all: bool = False  # torchreid's combineall: query and gallery images (not distractors) train too
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 120
    batch: int = 64
    k: int = 4  # images per identity in a batch (P = batch / k identities)
    optimizer: str = "sgd"
    lr: float = 0.008
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 1.0  # the biases' lr as a multiple of the schedule's (TransReID's BIAS_LR_FACTOR: 2)
    warmup_epochs: float = 5.0
    # the first epochs train the head alone (BNNecks, ID classifiers), the backbone frozen: torchreid's
    # fixbase_epoch, fast-reid's FREEZE_ITERS; for a fresh classifier over pretrained weights
    freeze_epochs: int = 0
    min_lr_factor: float = 0.002  # cosine floor as a fraction of lr (TransReID)
    # "cosine" (TransReID) or "step": lr × gamma at each milestone epoch (the BoT baseline's 40, 70; torchreid's
    # multi_step, fast-reid's MultiStepLR), after the same warm-up
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU; bf16 or fp32 on either
    compile: bool = False
    compile_mode: str = "default"  # default, reduce-overhead (torch's CUDA graphs), max-autotune-no-cudagraphs
    cuda_graph: bool = True  # on one CUDA GPU: the whole step (augmentation to optimizer) is one CUDA graph, replayed
    init: str | None = None  # timm-format weights file
    pretrained: str | None = None  # timm hub model name
    eval_every: int = 0
    max_grad_norm: float = 1e4  # larger gradient norms stop the run (divergence)
    check_every: int = 20  # steps between finiteness checks (each is a host sync)

    def validate(self, weights_file: bool = True) -> TrainConfig:
        """Check the options; ``weights_file``: that ``--init`` exists (not needed when a checkpoint is resumed)."""
        self.model.validate()
        self.loss.validate()
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.k < 1 or self.batch < 2 * self.k or self.batch % self.k:
            raise ConfigError(f"--batch {self.batch} must be a multiple of --k {self.k} with at least 2 identities")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"unknown --optimizer {self.optimizer!r}; use sgd or adamw")
        if self.lr <= 0:
            raise ConfigError("--lr must be positive")
        if self.bias_lr_factor <= 0:
            raise ConfigError(
                f"--bias-lr-factor {self.bias_lr_factor:g} must be positive (the biases' lr as a multiple of --lr; 1: "
                "the same)"
            )
        for name, value in (("weight-decay", self.weight_decay), ("warmup-epochs", self.warmup_epochs)):
            if value < 0:
                raise ConfigError(f"--{name} cannot be negative, got {value}")
        self._validate_schedule()
        self.augment.validate()
        if not 0 <= self.freeze_epochs < self.epochs:
            raise ConfigError(
                f"--freeze-epochs {self.freeze_epochs} must be at least 0 and below --epochs {self.epochs} (the "
                "backbone needs epochs of its own)"
            )
        if self.freeze_epochs and "ce" not in self.loss.names:
            raise ConfigError(
                "--freeze-epochs trains the head (BNNeck and ID classifier) alone at first, which only the ce loss "
                "reaches; add ce to --loss"
            )
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be 0 (never) or a number of epochs, got {self.eval_every}")
        metric_losses = set(self.loss.names) & {"triplet", "patch-triplet", "rp-triplet"}
        if metric_losses and self.k < 2:
            needs = ", ".join(sorted(metric_losses))
            raise ConfigError(f"--k {self.k} leaves no positive pair in a batch for {needs}; use --k 2 or more")
        patches = self.model.grid[0] * self.model.grid[1]
        if set(self.loss.names) & {"patch-triplet", "rp-triplet"} and self.loss.top_n > patches:
            raise ConfigError(f"--top-n {self.loss.top_n} exceeds the model's {patches} patches; lower --top-n")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; choose one of {', '.join(TRAIN_PRECISIONS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown --compile-mode {self.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.cuda_graph and self.compile and self.compile_mode == "reduce-overhead":
            raise ConfigError("--cuda-graph already captures the step; use it with --compile-mode default, or alone")
        if self.combine_all and self.eval_every:
            raise ConfigError(
                "--combine-all trains on the query and gallery images too: --eval-every would evaluate on training "
                "images; leave one of them out"
            )
        if len({str(Path(p).resolve()) for p in (self.data, *self.extra_data)}) != 1 + len(self.extra_data):
            raise ConfigError("--extra-data names --data or one file twice; give each dataset once")
        if weights_file and self.init and not Path(self.init).is_file():
            raise ConfigError(f"--init {self.init} not found; pass an existing .pth or .safetensors weights file")
        if "rp-triplet" in self.loss.names and self.model.pe == "none":
            raise ConfigError("rp-triplet needs position parameters; use --pe ape, rpe, both or sincos")
        return self

    def _validate_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule != "step":
            return
        shown = ",".join(map(str, self.milestones))
        if not self.milestones or list(self.milestones) != sorted(set(self.milestones)) or self.milestones[0] < 1:
            raise ConfigError(f"--milestones {shown or 'none'}: give increasing epochs from 1 on, e.g. 40,70")
        if self.milestones[-1] >= self.epochs:
            raise ConfigError(
                f"--milestones {shown}: {self.milestones[-1]} is not below --epochs {self.epochs}, so that step would "
                f"never happen; give milestones below {self.epochs}"
            )
        if self.milestones[0] < self.warmup_epochs:
            raise ConfigError(
                f"--milestones {shown}: {self.milestones[0]} falls inside the --warmup-epochs {self.warmup_epochs:g}; "
                "give milestones after the warm-up, or a shorter warm-up"
            )
        if not 0 < self.gamma < 1:
            raise ConfigError(f"--gamma {self.gamma} must lie between 0 and 1 (the lr's factor at each milestone)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = {k: v for k, v in d.items() if k in _FIELDS}  # config.json adds dataset, num_train_ids, world_size
        if "bf16" in d:  # config.json before --precision: bf16 autocast on CUDA only, i.e. "auto"
            d["precision"] = "auto" if d.pop("bf16") else "fp32"
        d["model"] = ModelConfig.from_dict(d["model"])
        d["extra_data"] = tuple(d.get("extra_data", ()))
        d["milestones"] = tuple(d.get("milestones", cls.milestones))
        d["loss"] = LossConfig(**d["loss"])
        aug = dict(d["augment"])
        aug["erase_area"] = tuple(aug["erase_area"])
        if "jitter_strength" in aug:
            aug["jitter_strength"] = tuple(aug["jitter_strength"])
        d["augment"] = AugmentConfig(**aug)
        return cls(**d)


_FIELDS = {f for f in TrainConfig.__dataclass_fields__} | {"bf16"}
# What --resume may change: where and how the steps run, and how long (a longer run stretches the cosine schedule
# from the checkpoint on). Everything else sets the trajectory and must stay the run's own.
RESUME_FREE = frozenset(
    {
        "data",
        "run_dir",
        "epochs",
        "device",
        "precision",
        "compile",
        "compile_mode",
        "cuda_graph",
        "init",
        "pretrained",
        "eval_every",
        "check_every",
    }
)


def load_train_config(run: str | Path) -> TrainConfig:
    """The resolved training config a run folder's ``config.json`` holds."""
    config = read_run_config(run)
    try:
        return TrainConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(
            f"{RunFiles(run).config} is not a training config this reidcli reads ({type(e).__name__}: {e}); "
            "restore it, or train into a new folder"
        ) from e


def trajectory_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The trajectory options of ``cfg`` that differ from the run's ``saved`` ones, as ``--flag saved (given new)``."""
    a, b = saved.to_dict(), cfg.to_dict()
    a["model"].pop("num_classes"), b["model"].pop("num_classes")  # set from the dataset at build time
    flat_a, flat_b = _flatten(a), _flatten(b)
    return [
        f"--{_flag(key)} {_shown(flat_a[key], key)} (given {_shown(flat_b.get(key), key)})"
        for key in flat_a
        if key.split(".")[0] not in RESUME_FREE and flat_a[key] != flat_b.get(key)
    ]


def _shown(value, key: str = "") -> str:
    """An option's value as typed: sizes as ``HxW``, epochs as ``40,70``, paths comma-separated (``none`` when
    empty)."""
    if isinstance(value, (list, tuple)):
        if key == "model.image_size":
            return "x".join(map(str, value))
        if key == "augment.erase_area":
            return "-".join(f"{v:g}" for v in value)
        if key == "augment.jitter_strength":
            return ",".join(f"{v:g}" for v in value)
        return ("," if all(isinstance(v, int) for v in value) else ", ").join(map(str, value)) or "none"
    return str(value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _flag(key: str) -> str:
    name = {
        "loss.spec": "loss",
        "model.image_size": "image-size",
        "model.sie_cameras": "sie (cameras)",
        **{f"augment.{field}": flag for field, flag in AUGMENT_FLAGS.items()},
    }.get(key, key.split(".", 1)[-1])
    return name.replace("_", "-")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    epochs_done: int
    metrics: list[dict]
    params: dict


def lr_at(step: float, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 1% of lr, then cosine down to ``min_lr_factor``·lr, or (``step``) lr × gamma for each
    milestone epoch reached, per step."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (0.01 + 0.99 * epoch / cfg.warmup_epochs)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    t = min(1.0, (epoch - cfg.warmup_epochs) / span)
    floor = cfg.lr * cfg.min_lr_factor
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))


def _param_groups(model: ViTReID, weight_decay: float, bias_lr_factor: float = 1.0) -> list[dict]:
    """No weight decay on biases, norms and position tables. With ``bias_lr_factor`` other than 1 the biases form a
    third group whose ``lr_scale`` multiplies the schedule's lr (TransReID's BIAS_LR_FACTOR); at 1 the two groups
    are as they always were, so older checkpoints resume."""
    skip = model.no_weight_decay()
    decay, no_decay, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if bias_lr_factor != 1.0 and name.endswith(".bias"):
            biases.append(p)
        else:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if biases:
        groups.append({"params": biases, "weight_decay": 0.0, "lr_scale": bias_lr_factor})
    return groups


def _optimizer(model: ViTReID, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay, cfg.bias_lr_factor)
    # On CUDA one fused kernel updates every tensor; on the CPU the for-each path keeps runs bit-reproducible.
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fused)


@dataclass
class _State:
    """What the loop carries between epochs, and what a checkpoint restores."""

    model: ViTReID
    opt: torch.optim.Optimizer
    gen: torch.Generator
    dist: DistInfo = field(default_factory=DistInfo)
    epoch: int = 0
    metrics: list[dict] = field(default_factory=list)
    # the center loss's identity centres (classes, D) and their own SGD (constant lr); None without the center loss
    centers: torch.nn.Parameter | None = None
    center_opt: torch.optim.Optimizer | None = None


def _build(cfg: TrainConfig, num_classes: int, device: torch.device, initial_weights: bool = True) -> _State:
    """The model, optimiser and sampler generator; ``initial_weights`` loads ``--init``/``--pretrained`` (not when a
    checkpoint is restored next: a resumed ``--pretrained`` run needs no hub access)."""
    torch.manual_seed(cfg.seed)
    model = ViTReID(replace(cfg.model, num_classes=num_classes))
    if initial_weights and cfg.init:
        from reidcli.model.weights import load_init_weights, load_state_file

        _report_init(cfg.init, load_init_weights(model, load_state_file(cfg.init)))
    elif initial_weights and cfg.pretrained:
        from reidcli.model.weights import load_pretrained

        _report_init(cfg.pretrained, load_pretrained(model, cfg.pretrained))
    if initial_weights and (cfg.init or cfg.pretrained):
        model.sync_jpm()  # the JPM branch starts as the loaded last block, as TransReID's does
    model.to(device)
    state = _State(model, _optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed))
    if "center" in cfg.loss.names:  # N(0, 1) centres as TransReID's CenterLoss, drawn after the model's weights
        state.centers = torch.nn.Parameter(torch.randn(num_classes, cfg.model.dim).to(device))
        fused = {"fused": True} if device.type == "cuda" else {}
        state.center_opt = torch.optim.SGD([state.centers], lr=cfg.loss.center_lr, **fused)
    return state


def _report_init(source: str, keys: dict[str, list[str]]) -> None:
    """What the initial weights left out: the backbone's tensors (a warning: they start from random values, most
    likely keys of another naming or depth), position tables (the RPE starts at zero, as it should for ImageNet
    weights) and the head (BNNeck and classifier: always this dataset's own)."""
    backbone = [k for k in keys["missing"] if k.startswith(("blocks.", "patch_embed.", "norm.", "cls_token"))]
    if backbone:
        log.warning(
            "%d backbone tensors are not in %s (e.g. %s) and start from random values; check that the weights are a "
            "ViT of this depth and width with timm's key names",
            len(backbone),
            source,
            ", ".join(backbone[:3]),
        )
    unused = [k for k in keys["unexpected"] if k.startswith("blocks.")]
    if unused:
        log.warning(
            "%d block tensors of %s have no place in this model (e.g. %s): it is shallower than the weights; "
            "match --depth to them",
            len(unused),
            source,
            ", ".join(unused[:2]),
        )
    tables = [k for k in keys["missing"] if k.startswith(("pos.", "rel_pos.", "sie_embed"))]
    log.info(
        "initial weights from %s: %d position tensors not in them (start fresh: %s), %d of theirs unused",
        source,
        len(tables),
        ", ".join(tables[:2]) or "none",
        len(keys["unexpected"]),
    )


def _restore(state: _State, files: RunFiles) -> None:
    ckpt = load_checkpoint(files.checkpoint)
    try:
        state.model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(
            f"{files.checkpoint} was trained with other model options ({str(e).splitlines()[0]}); "
            "resume with the run's own options or start a new run folder"
        ) from e
    state.opt.load_state_dict(ckpt["optimizer"])
    if state.centers is not None:
        if "centers" not in ckpt:
            raise ConfigError(f"{files.checkpoint} holds no center-loss centres; resume with the run's own --loss")
        with torch.no_grad():
            state.centers.copy_(ckpt["centers"])
    state.gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    if "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    state.epoch = int(ckpt["epoch"])
    state.metrics = [r for r in read_metrics(files.metrics) if r["epoch"] <= state.epoch]


def _check_same_trajectory(cfg: TrainConfig, files: RunFiles) -> None:
    if not files.config.is_file():
        return
    saved = load_train_config(files.root)
    changes = trajectory_changes(saved, cfg)
    if changes:
        raise ConfigError(
            f"{files.root} was trained with {', '.join(changes)}; --resume continues a run with its own options "
            "(leave those out), or train into a new --out"
        )
    if saved.epochs != cfg.epochs and cfg.schedule == "cosine":
        log.info(
            "resuming %s with --epochs %d (was %d): the cosine schedule now spans the new length",
            files.root,
            cfg.epochs,
            saved.epochs,
        )


def _save(state: _State, files: RunFiles) -> None:
    # metrics first: interrupted between the two, the checkpoint is the previous epoch's and resuming drops the
    # newer metrics row (it keeps rows up to the checkpoint's epoch) and trains that epoch again; the other order
    # would lose the row of an epoch the checkpoint holds
    write_metrics(files.metrics, state.metrics)
    save_checkpoint(
        files.checkpoint,
        {
            "model": state.model.state_dict(),
            "optimizer": state.opt.state_dict(),
            **({"centers": state.centers.detach()} if state.centers is not None else {}),
            "generator": state.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
            "epoch": state.epoch,
        },
    )


def check_resumable(run: str | Path) -> None:
    """Refuse ``--resume`` of a folder with final weights but no checkpoint (e.g. made by 'reid import'): there is
    no optimiser state or epoch to continue from, and training from scratch would overwrite those weights."""
    files = RunFiles(run)
    if files.weights.exists() and not files.checkpoint.exists():
        raise ConfigError(
            f"{files.root} holds final weights but no checkpoint.pt to resume (imported with 'reid import', or the "
            f"checkpoint was deleted); fine-tune from them with 'reid train --init {files.weights} --out NEW'"
        )


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train into ``cfg.run_dir``; with ``resume`` continue from its checkpoint on the same trajectory."""
    files = RunFiles(cfg.run_dir)
    restoring = resume and files.checkpoint.exists()
    if resume:
        check_resumable(files.root)
    cfg.validate(weights_file=not restoring)
    if (files.checkpoint.exists() or files.weights.exists()) and not resume:
        raise ConfigError(f"{files.root} already holds a run; pass --resume to continue it or choose another --out")
    if restoring:  # before the dataset is read and the model built: a refusal should cost nothing
        _check_same_trajectory(cfg, files)
    info, device = setup_distributed(resolve_device(cfg.device))
    attrs, train_split = _train_split(cfg)
    pids, labels = np.unique(train_split.pids, return_inverse=True)
    sampler = PKSampler(labels, cfg.batch // cfg.k, cfg.k, info.rank, info.world)
    state = _build(cfg, len(pids), device, initial_weights=not restoring)
    state.dist = info
    if restoring:
        _restore(state, files)
    if info.main:
        files.root.mkdir(parents=True, exist_ok=True)
        extra = {
            "dataset": attrs.get("name"),
            "num_train_ids": int(len(pids)),
            "world_size": info.world,
            "environment": _environment(cfg, device),
        }
        if cfg.model.sie_cameras and cfg.extra_data:  # where each file's cameras sit among the model's
            extra["camera_offsets"] = camera_offsets(cfg.data, cfg.extra_data)
        model_dict = {**cfg.model.to_dict(), "num_classes": len(pids)}
        write_json_atomic(files.config, {**cfg.to_dict(), "model": model_dict, **extra})
    images = torch.from_numpy(train_split.images).to(device)  # uint8 (N, H, W, 3), resident for the whole run
    targets = torch.from_numpy(labels).to(device)
    cams = torch.from_numpy(train_split.camids).to(device) if state.model.uses_cameras else None
    runner = _StepRunner(state, cfg, device, images, targets, cams)
    plotted = time.monotonic()
    while state.epoch < cfg.epochs:
        row = _run_epoch(state, cfg, sampler, runner, on_step)
        _check_replicas(state)
        if cfg.eval_every and (state.epoch + 1) % cfg.eval_every == 0 and info.main:
            row.update(_quick_eval(state.model, cfg, device))
        state.epoch += 1
        state.metrics.append(row)
        if info.main:
            _save(state, files)
            if time.monotonic() - plotted >= CURVES_EVERY_S:  # a long run's progress, for whoever looks at it
                _plot_curves(state, files)
                plotted = time.monotonic()
        barrier(info)
        if on_epoch and info.main:
            on_epoch(row)
    if info.main:
        _finish(state, cfg, files)
    teardown_distributed(info)  # after a barrier: every rank has finished
    return TrainResult(files.root, state.epoch, state.metrics, parameter_report(state.model))


def _environment(cfg: TrainConfig, device: torch.device) -> dict:
    """What ran the run (the last start or resume), for reports: versions, device, the precision ``auto`` chose."""
    import platform

    import timm

    from reidcli import __version__

    env = {
        "reidcli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "precision": train_precision(cfg.precision, device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _train_split(cfg: TrainConfig):
    """The train split of ``cfg.data``, or of it and ``cfg.extra_data`` joined (see :func:`joined_train_split`)."""
    attrs, train = joined_train_split(cfg.data, cfg.extra_data, cfg.model.image_size, cfg.combine_all)
    if cfg.model.sie_cameras:
        what = f"{cfg.data}'s train split" + (" and the --extra-data ones" if cfg.extra_data else "")
        check_cameras(cfg.model, train.camids, what)
    return attrs, train


def camera_offsets(data: str, extra: tuple[str, ...]) -> dict[str, int]:
    """Each dataset file (resolved path) → the shift :func:`joined_train_split` gives its camera ids: a camera-
    embedding model trained on joined files learned file k's camera c as c + its offset."""
    from reidcli.data.store import dataset_cameras

    offsets, base = {}, 0
    for path in (data, *extra):
        offsets[str(Path(path).resolve())] = base
        base += dataset_cameras(path)
    return offsets


def joined_train_split(
    data: str,
    extra: tuple[str, ...],
    image_size: tuple[int, int],
    combine_all: bool = False,
    images: bool = True,
):
    """The train splits of ``data`` and each ``extra`` dataset as one: each file's pids and camera ids are shifted
    past the previous files' (1 + largest pid; camera count over all its splits), so identities and cameras of
    different datasets stay apart and ``data``'s keep their own ids (its query and gallery are evaluated as they
    are). ``combine_all`` (torchreid's ``combineall``): each file's query and gallery images join its train images,
    distractors (pid 0) left out. The attributes are ``data``'s, with the datasets' names joined by ``+``."""
    parts, names = [], []
    pid_base = 0
    cam_bases = camera_offsets(data, extra) if extra else {}
    for path in (data, *extra):
        attrs, splits = read_dataset(path, ("train",), images=images)
        if combine_all:  # the test splits' labels, then only the images kept (not the distractors, e.g. 500k)
            splits.update(read_dataset(path, ("query", "gallery"), images=False)[1])
        size = tuple(attrs["image_size"])
        if tuple(image_size) != size:
            h, w = image_size
            raise ConfigError(
                f"the images of {path} are {size[0]}x{size[1]} but the model expects {h}x{w}; train at the dataset's "
                f"size (leave --image-size out) or prepare every dataset at {h}x{w} ('reid prepare --image-size "
                f"{h}x{w}')"
            )
        train = splits["train"]
        if combine_all:
            keep = {s: splits[s].pids != 0 for s in ("query", "gallery")}
            train = DatasetSplit(
                np.concatenate([train.images, *(read_images(path, s, np.flatnonzero(k)) for s, k in keep.items())])
                if images
                else train.images,
                np.concatenate([train.pids, *(splits[s].pids[k] for s, k in keep.items())]),
                np.concatenate([train.camids, *(splits[s].camids[k] for s, k in keep.items())]),
                train.paths + [p for s, k in keep.items() for p, kept in zip(splits[s].paths, k, strict=True) if kept],
            )
        if not parts:
            first = attrs
        parts.append((train, pid_base, cam_bases.get(str(Path(path).resolve()), 0)))
        names.append(str(attrs.get("name", Path(path).stem)))
        pid_base += int(train.pids.max()) + 1 if len(train) else 0  # the next file's identities: past this one's
    if len(parts) == 1:
        return first, parts[0][0]
    joined = DatasetSplit(
        np.concatenate([t.images for t, _, _ in parts]),
        np.concatenate([t.pids + p for t, p, _ in parts]),
        np.concatenate([t.camids + c for t, _, c in parts]),
        [path for t, _, _ in parts for path in t.paths],
    )
    return {**first, "name": "+".join(names)}, joined


def _make_step(state: _State, cfg: TrainConfig, device: torch.device):
    model = state.model
    if state.dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    autocast = train_precision(cfg.precision, device) == "bf16"
    params = [p for p in state.model.parameters() if p.requires_grad]
    patches = cfg.loss.reads_patches  # else the last block runs for the CLS token alone

    def step(
        x: torch.Tensor, y: torch.Tensor, epoch: float | torch.Tensor, cams: torch.Tensor | None = None
    ) -> tuple[dict, torch.Tensor, dict]:
        stats: dict[str, torch.Tensor] = {}
        # no autocast weight cache: cached casts would be stale tensors inside a captured CUDA graph
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = model(x, cams, patches=patches)
            comps = compute_losses(state.model, out, y, cfg.loss, epoch, stats, state.centers)
        loss = sum(comps.values())
        state.opt.zero_grad(set_to_none=True)
        if state.center_opt is not None:
            state.center_opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _total_norm(params)
        state.opt.step()
        if state.center_opt is not None:
            _center_step(state, cfg.loss.center_weight)
        return comps, grad_norm, stats

    return step


def _check_replicas(state: _State) -> None:
    """With several processes: every trained tensor (the model's parameters, the center-loss centres) must still be
    rank 0's after the epoch. DDP keeps its module's copies equal by averaging their gradients; the centres are
    averaged by :func:`_center_step`. A drift would make the saved model rank 0's alone, so it stops the run on every
    process before that epoch is saved."""
    if not state.dist.enabled:
        return
    named = dict(state.model.named_parameters())
    if state.centers is not None:
        named["center-loss centres"] = state.centers
    bad = first_differing_replica(named, state.dist)
    if bad is not None:
        raise TrainingError(
            f"after epoch {state.epoch + 1} the processes' copies of {bad} differ from rank 0's: the replicas drifted "
            f"apart (a reidcli bug; please report it with the command); the checkpoint kept is epoch {state.epoch}'s"
        )


def _center_step(state: _State, weight: float) -> None:
    """The centres' SGD step on the unweighted center-loss gradient (TransReID divides the centres' gradient by the
    loss weight): the features feel ``weight``, the centres move at ``--center-lr`` whatever the weight. The centres
    are outside DDP's module, so their gradient is averaged over the processes here."""
    grad = state.centers.grad
    if grad is None:
        return
    if weight > 0:
        grad.mul_(1.0 / weight)
    if state.dist.enabled:
        torch.distributed.all_reduce(grad)
        grad.div_(state.dist.world)
    state.center_opt.step()


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients as a device tensor (no host sync, gradients left untouched)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class _Sums:
    """An epoch's running sums on the device, updated in place (so a captured CUDA graph keeps updating them)."""

    def __init__(self, device: torch.device):
        self.losses: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.grad_max = torch.zeros((), device=device)

    @staticmethod
    def _add(into: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        if name not in into:
            into[name] = torch.zeros((), device=value.device)
        into[name].add_(value.detach().float())

    def add(self, comps: dict, stats: dict, grad_norm: torch.Tensor) -> None:
        for k, v in comps.items():
            self._add(self.losses, k, v)
        for k, v in stats.items():
            self._add(self.stats, k, v)
        torch.maximum(self.grad_max, grad_norm.detach().float(), out=self.grad_max)

    def reset(self) -> None:
        for t in [*self.losses.values(), *self.stats.values(), self.grad_max]:
            t.zero_()


class _StepRunner:
    """One training step on the resident images: gather, augment, forward, losses, backward, gradient norm,
    optimizer, and the epoch sums, all on the device.

    With ``cfg.cuda_graph`` (CUDA, one process) the whole step is captured once into a CUDA graph and replayed:
    the host then issues a handful of launches per step instead of about a thousand kernels. The capture warms up
    on a side stream, then restores the weights, optimizer state, RNG and sums, so the run's trajectory is the
    same as without the graph; a failed capture falls back to eager steps with a warning.
    """

    def __init__(self, state: _State, cfg: TrainConfig, device: torch.device, images, targets, cams=None):
        self.state, self.cfg, self.device = state, cfg, device
        self.images, self.targets = images, targets
        self.cams = cams  # each image's camera, for a model with camera embeddings (SIE); else None
        self.step_fn = _make_step(state, cfg, device)
        self.sums = _Sums(device)
        self.use_graph = cfg.cuda_graph and device.type == "cuda" and not state.dist.enabled
        self.graph = None
        self.frozen = False  # the backbone frozen (--freeze-epochs): the head trains alone

    def set_frozen(self, frozen: bool) -> None:
        """Freeze or thaw the backbone for the coming epoch (after ``model.train()``, which resets the modes). On a
        change the step is made again (the gradient norm's parameter list, DDP's reducer) and a captured graph is
        dropped: the next step captures the other set of learning parameters."""
        self.state.model.freeze_backbone(frozen)
        if frozen != self.frozen:
            self.frozen = frozen
            self.step_fn = _make_step(self.state, self.cfg, self.device)
            self.graph = None

    def _body(self, idx: torch.Tensor, r: torch.Tensor, epoch) -> None:
        x = augment_batch(self.images[idx], self.cfg.augment, r=r)
        cams = None if self.cams is None else self.cams[idx]
        comps, grad_norm, stats = self.step_fn(x, self.targets[idx], epoch, cams)
        self.sums.add(comps, stats, grad_norm)

    def __call__(self, idx: torch.Tensor, r: torch.Tensor, lr: float, epoch: float) -> None:
        if self.use_graph and self.graph is None:
            self._capture(idx, r, epoch)
        if self.graph is None:
            for group in self.state.opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self._body(idx, r, epoch)
            return
        self.static_idx.copy_(idx)
        self.static_r.copy_(r)
        self.static_epoch.fill_(epoch)
        for t, group in zip(self.lrs, self.state.opt.param_groups, strict=True):
            t.fill_(lr * group.get("lr_scale", 1.0))
        self.graph.replay()

    def _snapshot(self):
        st = self.state
        model = {k: v.detach().clone() for k, v in st.model.state_dict(keep_vars=True).items()}
        opt = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in st.opt.state.items()}
        centers = None if st.centers is None else st.centers.detach().clone()  # their SGD keeps no state
        return model, opt, centers, torch.cuda.get_rng_state(self.device)

    @torch.no_grad()
    def _restore(self, snap) -> None:
        model, opt, centers, rng = snap
        for k, v in self.state.model.state_dict(keep_vars=True).items():
            v.copy_(model[k])
        if centers is not None:
            self.state.centers.copy_(centers)
        for p, s in self.state.opt.state.items():
            old = opt.get(p, {})
            for k, v in s.items():
                if not torch.is_tensor(v):
                    continue
                if k in old:
                    v.copy_(old[k])
                else:  # state made by the warm-up starts from zero: SGD's first step, AdamW's step 0
                    v.zero_()
        torch.cuda.set_rng_state(rng, self.device)
        self.sums.reset()

    def _capture(self, idx: torch.Tensor, r: torch.Tensor, epoch: float) -> None:
        dev, opt = self.device, self.state.opt
        self.static_idx, self.static_r = idx.clone(), r.clone()
        self.static_epoch = torch.full((), float(epoch), device=dev)
        floats = [float(g["lr"]) for g in opt.param_groups]
        capturable = [g.get("capturable") for g in opt.param_groups]
        self.lrs = [torch.full((), v, device=dev) for v in floats]
        for group, t in zip(opt.param_groups, self.lrs, strict=True):
            group["lr"] = t  # a device scalar the graph reads: set per step with fill_
            if "capturable" in group:
                group["capturable"] = True
        snap = self._snapshot()
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._body(self.static_idx, self.static_r, self.static_epoch)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            self._restore(snap)
            opt.zero_grad(set_to_none=True)
            if self.state.center_opt is not None:
                self.state.center_opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body(self.static_idx, self.static_r, self.static_epoch)
            self.graph = graph
        except RuntimeError as e:
            log.warning("CUDA graph capture failed (%s); training with eager steps", str(e).splitlines()[0])
            with contextlib.suppress(RuntimeError):  # a broken capture may leave an error to collect
                torch.cuda.synchronize(dev)
            self._restore(snap)
            for group, v, cap in zip(opt.param_groups, floats, capturable, strict=True):
                group["lr"] = v
                if cap is not None:
                    group["capturable"] = cap  # uncaptured steps run faster without it
            opt.zero_grad(set_to_none=True)
            self.use_graph = False
            self.graph = None


def _run_epoch(state: _State, cfg, sampler, runner: _StepRunner, on_step) -> dict:
    state.model.train()
    frozen = state.epoch < cfg.freeze_epochs
    if cfg.freeze_epochs:
        runner.set_frozen(frozen)
    images = runner.images
    # The epoch's batches and augmentation draws go to the device once: a step copies nothing from the host
    # (a blocking host-to-device copy per step would stall the GPU queue every step).
    batches = sampler.epoch(state.gen).to(images.device)
    n = len(batches)
    draws = torch.rand(n, batches.shape[1], cfg.augment.draws, generator=state.gen).to(images.device)
    sums = runner.sums
    sums.reset()
    t0 = time.perf_counter()
    for i in range(n):
        lr = lr_at(state.epoch * n + i, n, cfg)
        runner(batches[i], draws[i], lr, state.epoch + i / n)
        if (i + 1) % cfg.check_every == 0 or i == n - 1:
            _check_finite(sums.losses, sums.grad_max, cfg, state)
        if on_step:
            on_step(i + 1, n)
    seconds = time.perf_counter() - t0
    world = state.dist.world
    row = {
        "epoch": state.epoch + 1,
        "lr": lr,
        "seconds": seconds,
        "images_per_s": world * n * batches.shape[1] / seconds,
        "grad_norm_max": float(sums.grad_max),
        "step": "cuda-graph" if runner.graph is not None else "eager",
    }
    if cfg.freeze_epochs:
        row["backbone_frozen"] = frozen
    # losses averaged over all processes' batches
    row.update({f"loss_{k}": float(all_reduce_sum(v, state.dist)) / (n * world) for k, v in sums.losses.items()})
    row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
    row.update({k: float(all_reduce_sum(v, state.dist)) / (n * world) for k, v in sums.stats.items()})
    row.update(_position_norms(state.model))
    return row


def _check_finite(sums: dict[str, torch.Tensor], grad_max: torch.Tensor, cfg: TrainConfig, state: _State) -> None:
    """Every rank sees the same verdict: the sums are reduced across processes first."""
    epoch = state.epoch
    sums = {k: all_reduce_sum(v, state.dist) for k, v in sums.items()}
    for name, v in sums.items():
        if not bool(torch.isfinite(v)):
            raise TrainingError(
                f"loss component '{name}' became non-finite in epoch {epoch + 1}; training stopped, "
                "the last good checkpoint is kept (lower --lr, or use --rp-form stable)"
            )
    if not bool(torch.isfinite(grad_max)) or float(grad_max) > cfg.max_grad_norm:
        raise TrainingError(
            f"gradient norm exploded ({float(grad_max):.3g} > {cfg.max_grad_norm:g}) in epoch "
            f"{epoch + 1}; training stopped, the last good checkpoint is kept (lower --lr)"
        )


def _position_norms(model: ViTReID) -> dict[str, float]:
    out = {}
    if model.pos is not None and model.cfg.pe != "sincos":
        out["ape_norm"] = float(model.pos.pos_embed.detach().norm())
    if model.rel_pos is not None:
        out["rpe_norm"] = float(
            torch.stack([r.relative_position_bias_table.detach().norm() for r in model.rel_pos]).norm()
        )
    return out


def _quick_eval(model: ViTReID, cfg: TrainConfig, device: torch.device) -> dict:
    from reidcli.engine.extract import embed_dataset
    from reidcli.retrieval.evaluate import EvalConfig, evaluate

    feats = embed_dataset(model, cfg.data, ("query", "gallery"), device=device, precision=cfg.precision)
    out = evaluate(feats["query"], feats["gallery"], EvalConfig(engine="torch", device=str(device)))
    return {"eval_mAP": out.metrics.mAP, "eval_rank1": out.metrics.cmc[0]}


def _finish(state: _State, cfg: TrainConfig, files: RunFiles) -> None:
    save_weights(files.weights, state.model, {"model": state.model.cfg.to_dict(), "epochs": state.epoch})
    _plot_curves(state, files)


def _plot_curves(state: _State, files: RunFiles) -> None:
    try:
        from reidcli.report.plots import plot_training_curves

        plot_training_curves(state.metrics, files.curves, title=files.root.name)
    except Exception as e:  # noqa: BLE001 — a plot must never lose a run
        log.warning("could not plot training curves: %s", e)
