"""Option aliases shared by several commands, and small parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.errors import ConfigError

__all__ = [
    "JsonOpt",
    "DeviceOpt",
    "DataOpt",
    "check_out_folder",
    "parse_size",
    "parse_list",
    "given_options",
    "refuse_unused",
    "LOSS_OPTION_NEEDS",
    "check_loss_options",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Dataset HDF5 from 'reid prepare'.")]

# Model and schedule options shared by `train` and `ablate`.
PresetOpt = Annotated[str | None, typer.Option(help="vit_tiny, vit_small or vit_base.")]
DimOpt = Annotated[int | None, typer.Option(help="Width (overrides the preset).")]
DepthOpt = Annotated[int | None, typer.Option(help="Blocks (overrides the preset).")]
HeadsOpt = Annotated[int | None, typer.Option(help="Attention heads (overrides the preset).")]
PatchOpt = Annotated[int, typer.Option(help="Patch size in pixels.")]
StrideOpt = Annotated[int | None, typer.Option(help="Patch stride (< patch size: overlapping patches).")]
ImageSizeOpt = Annotated[str | None, typer.Option(help="HEIGHTxWIDTH (default: the dataset's).")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
BatchOpt = Annotated[int, typer.Option(help="Images per batch (P identities × K).")]
KOpt = Annotated[int, typer.Option("--k", help="Images per identity in a batch.")]
OptimizerOpt = Annotated[str, typer.Option(help="sgd or adamw.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate.")]
WeightDecayOpt = Annotated[float, typer.Option(help="Weight decay (not on biases, norms, position tables).")]
BiasLrFactorOpt = Annotated[
    float, typer.Option(help="The biases' lr as a multiple of the schedule's (TransReID's BIAS_LR_FACTOR is 2).")
]
WarmupOpt = Annotated[float, typer.Option(help="Linear warm-up epochs.")]
FreezeEpochsOpt = Annotated[
    int,
    typer.Option(
        help="First epochs train the head alone (BNNeck, ID classifier), the backbone frozen (torchreid's "
        "fixbase_epoch): for pretrained weights.",
    ),
]
ScheduleOpt = Annotated[
    str,
    typer.Option(
        help="lr schedule after the warm-up: cosine (TransReID) or step (lr × --gamma at each of --milestones, as the "
        "BoT baseline, torchreid's multi_step, fast-reid's MultiStepLR)."
    ),
]
MilestonesOpt = Annotated[str, typer.Option(help="--schedule step: comma-separated epochs where the lr drops.")]
GammaOpt = Annotated[float, typer.Option(help="--schedule step: the lr's factor at each milestone.")]
FlipProbOpt = Annotated[float, typer.Option(help="Training augmentation: probability of a horizontal flip.")]
PadOpt = Annotated[int, typer.Option(help="Training augmentation: border (pixels) of the pad + random crop; 0: off.")]
EraseProbOpt = Annotated[float, typer.Option(help="Training augmentation: probability of random erasing.")]
EraseAreaOpt = Annotated[
    str, typer.Option(help="Random erasing: LO-HI, the range of the rectangle's share of the image's area.")
]
EraseRatioOpt = Annotated[
    float, typer.Option(help="Random erasing: the rectangle's aspect ratio is drawn log-uniformly between r and 1/r.")
]
EraseFillOpt = Annotated[
    str,
    typer.Option(
        help="Random erasing fills the rectangle with grey (0 after normalisation) or noise (N(0, 1) per pixel, as "
        "TransReID)."
    ),
]
JitterProbOpt = Annotated[
    float,
    typer.Option(help="Training augmentation: probability of colour jitter (fast-reid's INPUT.CJ); 0: off."),
]
JitterOpt = Annotated[
    str,
    typer.Option(
        help="Colour jitter strengths brightness,contrast,saturation,hue, as torchvision's ColorJitter (fast-reid's "
        "defaults); applied in a random order per image."
    ),
]
DropPathOpt = Annotated[float, typer.Option(help="Stochastic depth rate.")]
TopNOpt = Annotated[int, typer.Option(help="Patches used by patch-triplet / rp-triplet.")]
RpFormOpt = Annotated[str, typer.Option(help="rp-triplet form: stable (default) or raw (the seed's).")]
NeckFeatOpt = Annotated[str, typer.Option(help="Test feature: before or after the BNNeck.")]
LabelSmoothingOpt = Annotated[float, typer.Option(help="CE label smoothing.")]
MarginOpt = Annotated[float | None, typer.Option(help="Triplet margin (default: soft margin).")]
RpWeightOpt = Annotated[float, typer.Option(help="rp-triplet weight.")]
PatchWeightOpt = Annotated[float, typer.Option(help="patch-triplet weight.")]
CeWeightOpt = Annotated[float, typer.Option(help="ce (ID) loss weight (TransReID's ID_LOSS_WEIGHT).")]
TripletWeightOpt = Annotated[float, typer.Option(help="triplet loss weight (TransReID's TRIPLET_LOSS_WEIGHT).")]
CenterWeightOpt = Annotated[float, typer.Option(help="center loss weight (TransReID's 0.0005).")]
CenterLrOpt = Annotated[float, typer.Option(help="Constant SGD step size of the center loss's centres.")]
EvalEveryOpt = Annotated[int, typer.Option(help="Evaluate on query/gallery every N epochs (0: never).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]


def _switch(name: str, text: str):
    """A ``--name/--no-name`` flag with its help ``text``."""
    return Annotated[bool, typer.Option(f"--{name}/--no-{name}", help=text)]


SieOpt = _switch(
    "sie",
    "TransReID's side-information embedding: a learnable vector per camera of the dataset, added to every token "
    "(extraction then uses each image's camera too).",
)
SieWeightOpt = Annotated[float, typer.Option(help="SIE coefficient (TransReID's 3).")]
JpmOpt = _switch(
    "jpm",
    "TransReID's jigsaw patch module: a copy of the last block over shifted, shuffled patch groups gives local "
    "features (trained with their own ID and triplet losses; the test feature appends them).",
)
JpmGroupsOpt = Annotated[int, typer.Option(help="JPM: patch groups (local features).")]
ExtraDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--extra-data",
        help="Another prepared dataset whose train split joins --data's (repeatable; identities and cameras kept "
        "apart); evaluation stays on --data.",
    ),
]
IdHeadOpt = Annotated[
    str,
    typer.Option(
        help="ID classifier: linear, or cosine logits with a margin on the label: cosface, arcface, circle "
        "(fast-reid's CosSoftmax, ArcSoftmax, CircleSoftmax)."
    ),
]
HeadScaleOpt = Annotated[float, typer.Option(help="Cosine ID head: logit scale.")]
HeadMarginOpt = Annotated[
    float | None, typer.Option(help="Cosine ID head: margin (default cosface 0.35, arcface 0.5, circle 0.35).")
]
JpmShiftOpt = Annotated[
    int,
    typer.Option(help="JPM: patches the tokens are rolled by before the shuffle (TransReID's SHIFT_NUM 5 rolls by 4)."),
]
JpmShuffleOpt = Annotated[int, typer.Option(help="JPM: interleave factor of the patch shuffle.")]
CudaGraphOpt = Annotated[
    bool,
    typer.Option(
        "--cuda-graph/--no-cuda-graph",
        help="On one GPU, replay the whole step as one CUDA graph (same results as eager steps, 1.5-1.8x faster).",
    ),
]
TrainPrecisionOpt = Annotated[
    str, typer.Option(help="auto (GPU bf16 autocast, CPU fp32), bf16 (CPU too: ~1.5x for ViT-S) or fp32.")
]


def parse_size(text: str) -> tuple[int, int]:
    """``'256x128'`` → ``(256, 128)`` (height × width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 256x128") from None
    if h < 1 or w < 1:
        raise ConfigError(f"size {text!r} must be positive")
    return h, w


def check_out_folder(path: Path) -> Path:
    """``--out`` of a command that writes a folder: fail before any work if it, or a folder above it, is a file."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"--out {path}: {part} is a file, not a folder; choose another --out")
            break
    return path


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def given_options(ctx: typer.Context) -> dict:
    """The options typed on the command line (or set in the environment), not those left at their defaults."""
    return {
        name: value
        for name, value in ctx.params.items()
        if (source := ctx.get_parameter_source(name)) is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
    }


def _flag(ctx: typer.Context, name: str) -> str:
    for param in ctx.command.params:
        if param.name == name:
            return max(param.opts, key=len)
    return "--" + name.replace("_", "-")


def refuse_unused(ctx: typer.Context, names: tuple[str, ...], applies: bool, without: str, fix: str) -> None:
    """Options typed where they do nothing (``--k1`` without ``--rerank``) are an error, not silently ignored: the
    user meant something the command would not do."""
    given = given_options(ctx)
    unused = [_flag(ctx, n) for n in names if n in given]
    if unused and not applies:
        one = len(unused) == 1
        raise ConfigError(
            f"{', '.join(unused)} {'has' if one else 'have'} no effect without {without}; "
            f"leave {'it' if one else 'them'} out or {fix}"
        )


# loss options → the --loss components they act on (--top-n also sets the patches `reid plot` boxes: always taken)
LOSS_OPTION_NEEDS = {
    "label_smoothing": ("ce",),
    "id_head": ("ce",),
    "margin": ("triplet", "patch-triplet"),
    "patch_weight": ("patch-triplet",),
    "rp_weight": ("rp-triplet",),
    "rp_form": ("rp-triplet",),
    "rp_warmup_epochs": ("rp-triplet",),  # no option of its own: swept by ablate --vary
    "ce_weight": ("ce",),
    "triplet_weight": ("triplet",),
    "center_weight": ("center",),
    "center_lr": ("center",),
}


def check_loss_options(ctx: typer.Context, specs: list[str]) -> None:
    """Refuse a loss option none of the ``--loss`` specs uses (e.g. ``--rp-weight`` with ``ce+triplet``)."""
    from reidcli.losses.combined import parse_loss_spec

    used = {name for spec in specs for name in parse_loss_spec(spec)}
    for option, needs in LOSS_OPTION_NEEDS.items():
        wanted = " or ".join(needs)
        refuse_unused(ctx, (option,), bool(used & set(needs)), f"{wanted} in --loss", f"add {wanted} to --loss")
