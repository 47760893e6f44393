"""``reid train``: ViT-ReID with a chosen positional encoding and loss, into a run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table, progress
from reidcli.cli.console import out as stdout
from reidcli.cli.options import (
    BatchOpt,
    BiasLrFactorOpt,
    CenterLrOpt,
    CenterWeightOpt,
    CeWeightOpt,
    CompileOpt,
    CudaGraphOpt,
    DepthOpt,
    DeviceOpt,
    DimOpt,
    DropPathOpt,
    EpochsOpt,
    EraseAreaOpt,
    EraseFillOpt,
    EraseProbOpt,
    EraseRatioOpt,
    EvalEveryOpt,
    ExtraDataOpt,
    FlipProbOpt,
    FreezeEpochsOpt,
    GammaOpt,
    HeadMarginOpt,
    HeadScaleOpt,
    HeadsOpt,
    IdHeadOpt,
    ImageSizeOpt,
    JitterOpt,
    JitterProbOpt,
    JpmGroupsOpt,
    JpmOpt,
    JpmShiftOpt,
    JpmShuffleOpt,
    JsonOpt,
    KOpt,
    LabelSmoothingOpt,
    LrOpt,
    MarginOpt,
    MilestonesOpt,
    NeckFeatOpt,
    OptimizerOpt,
    PadOpt,
    PatchOpt,
    PatchWeightOpt,
    PresetOpt,
    RpFormOpt,
    RpWeightOpt,
    ScheduleOpt,
    SieOpt,
    SieWeightOpt,
    StrideOpt,
    TopNOpt,
    TrainPrecisionOpt,
    TripletWeightOpt,
    WarmupOpt,
    WeightDecayOpt,
    check_loss_options,
    check_out_folder,
    given_options,
    parse_list,
    parse_size,
    refuse_unused,
)
from reidcli.errors import ConfigError

PeOpt = Annotated[str, typer.Option(help="Positional encoding: none, ape, sincos, rpe or both.")]
LossOpt = Annotated[str, typer.Option(help="'+'-joined losses: ce, triplet, center, patch-triplet, rp-triplet.")]


def model_options(
    pe: str,
    preset: str | None,
    dim: int | None,
    depth: int | None,
    heads: int | None,
    patch_size: int,
    stride: int | None,
    image_size: tuple[int, int],
    drop_path: float,
    neck_feat: str,
    sie_cameras: int = 0,
    sie_weight: float = 3.0,
    jpm: tuple[bool, int, int, int] = (False, 4, 4, 2),
    head: tuple[str, float, float] = ("linear", 64.0, 0.35),
):
    from reidcli.model.vit import ModelConfig

    base = ModelConfig.from_preset(preset) if preset else ModelConfig()
    return ModelConfig(
        pe=pe,
        image_size=image_size,
        patch_size=patch_size,
        stride=patch_size if stride is None else stride,
        dim=base.dim if dim is None else dim,
        depth=base.depth if depth is None else depth,
        heads=base.heads if heads is None else heads,
        drop_path=drop_path,
        neck_feat=neck_feat,
        sie_cameras=sie_cameras,
        sie_weight=sie_weight,
        jpm=jpm[0],
        jpm_groups=jpm[1],
        jpm_shift=jpm[2],
        jpm_shuffle=jpm[3],
        id_head=head[0],
        head_scale=head[1],
        head_margin=head[2],
    ).validate()


def head_options(ctx: typer.Context, id_head: str, scale: float, margin: float | None) -> tuple[str, float, float]:
    """``--id-head`` with its scale and margin (the head's own default margin when none is given); a scale or
    margin for the linear head is refused."""
    from reidcli.model.vit import HEAD_MARGINS

    refuse_unused(
        ctx, ("head_scale", "head_margin"), id_head != "linear", "a cosine --id-head", "add --id-head cosface, arcface "
        "or circle"
    )  # fmt: skip
    return id_head, scale, HEAD_MARGINS.get(id_head, 0.35) if margin is None else margin


def jpm_options(ctx: typer.Context, jpm: bool, groups: int, shift: int, shuffle: int) -> tuple[bool, int, int, int]:
    """``--jpm`` and its settings; the settings without ``--jpm`` are refused."""
    refuse_unused(ctx, ("jpm_groups", "jpm_shift", "jpm_shuffle"), jpm, "--jpm", "add --jpm")
    return jpm, groups, shift, shuffle


def sie_cameras(ctx: typer.Context, sie: bool, data: Path, extra: tuple[str, ...] = ()) -> int:
    """The camera embeddings ``--sie`` asks for (the datasets' camera count: --data's and each --extra-data's, kept
    apart), 0 without it; ``--sie-weight`` without ``--sie`` is refused."""
    refuse_unused(ctx, ("sie_weight",), sie, "--sie", "add --sie")
    return all_cameras(data, extra) if sie else 0


def all_cameras(data: str | Path, extra: tuple[str, ...] = ()) -> int:
    from reidcli.data.store import dataset_cameras

    return sum(dataset_cameras(p) for p in (data, *extra))


# the loss options of `train` and `ablate`: each command parameter is the LossConfig field of its name
LOSS_FIELDS = (
    "label_smoothing",
    "margin",
    "top_n",
    "rp_form",
    "ce_weight",
    "triplet_weight",
    "center_weight",
    "center_lr",
    "patch_weight",
    "rp_weight",
)


def loss_options(spec: str, params: dict):
    """The loss config of ``spec`` with the command's loss options (``params``: its parsed parameters by name);
    ``ablate`` sets ``spec`` per variant."""
    from reidcli.losses.combined import LossConfig

    return LossConfig(spec=spec, **{f: params[f] for f in LOSS_FIELDS})


def schedule_options(ctx: typer.Context, schedule: str, milestones: str, gamma: float, swept: bool = False) -> dict:
    """``--schedule`` with its ``--milestones`` and ``--gamma`` (TrainConfig's fields); those two are refused without
    ``--schedule step`` (``swept``: ``ablate`` sweeps ``--schedule``, and its step variants use them)."""
    refuse_unused(ctx, ("milestones", "gamma"), schedule == "step" or swept, "--schedule step", "add --schedule step")
    return {"schedule": schedule, "milestones": parse_milestones(milestones), "gamma": gamma}


def parse_milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in parse_list(text))
    except ValueError:
        raise ConfigError(f"--milestones {text!r} must be comma-separated epochs, e.g. 40,70") from None


def augment_options(ctx: typer.Context, swept: tuple[str, ...] = ()):
    """The training augmentation of ``--flip-prob``, ``--pad``, ``--erase-prob``, ``--erase-area``, ``--erase-ratio``,
    ``--erase-fill``, ``--jitter-prob`` and ``--jitter``; the erasing's and the jitter's options without erasing or
    jitter are refused (``swept``: the options ``ablate --vary`` sets per variant)."""
    from reidcli.data.augment import ERASE_OPTIONS, JITTER_OPTIONS, AugmentConfig

    erasing = ctx.params["erase_prob"] > 0 or "erase-prob" in swept
    refuse_unused(ctx, ERASE_OPTIONS, erasing, "--erase-prob above 0", "raise --erase-prob")
    jitter = ctx.params["jitter_prob"] > 0 or "jitter-prob" in swept
    refuse_unused(ctx, JITTER_OPTIONS, jitter, "--jitter-prob above 0", "add --jitter-prob 0.5")
    return AugmentConfig(**_augment_fields(ctx.params))


def _augment_fields(params: dict) -> dict:
    """AugmentConfig's fields among a command's ``params`` (by parameter name: ``flip_prob`` sets ``flip``;
    ``--erase-area`` and ``--jitter`` text is parsed)."""
    from reidcli.data.augment import AUGMENT_FLAGS, AUGMENT_PARSERS

    names = {field: flag.replace("-", "_") for field, flag in AUGMENT_FLAGS.items()}
    fields = {field: params[name] for field, name in names.items() if name in params}
    for field, parse in AUGMENT_PARSERS.items():
        if isinstance(fields.get(field), str):
            fields[field] = parse(fields[field])
    return fields


def dataset_image_size(data: Path) -> tuple[int, int]:
    from reidcli.data.store import read_dataset

    attrs, _ = read_dataset(data, (), images=False)
    return tuple(attrs["image_size"])


def check_image_size(size: tuple[int, int], data: Path) -> None:
    """``--image-size`` must be the dataset's (the images are stored resized once): refused before any work."""
    stored = dataset_image_size(data)
    if tuple(size) != tuple(stored):
        h, w = size
        raise ConfigError(
            f"--image-size {h}x{w} differs from the {stored[0]}x{stored[1]} images of {data}; leave --image-size out "
            f"(the dataset's size is the default) or prepare the dataset at {h}x{w} ('reid prepare --image-size')"
        )


def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run folder (config, checkpoints, metrics, weights, curves).")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset HDF5 from 'reid prepare' (with --resume: the run's own by default)."),
    ] = None,
    extra_data: ExtraDataOpt = None,
    combine_all: Annotated[
        bool,
        typer.Option(
            "--combine-all",
            help="Train on the query and gallery images too, distractors left out (torchreid's combineall: a final "
            "model for deployment; nothing left to evaluate on).",
        ),
    ] = False,
    pe: PeOpt = "ape",
    loss: LossOpt = "ce+triplet",
    preset: PresetOpt = "vit_base",
    dim: DimOpt = None,
    depth: DepthOpt = None,
    heads: HeadsOpt = None,
    patch_size: PatchOpt = 16,
    stride: StrideOpt = None,
    image_size: ImageSizeOpt = None,
    epochs: EpochsOpt = 120,
    batch: BatchOpt = 64,
    k: KOpt = 4,
    optimizer: OptimizerOpt = "sgd",
    lr: LrOpt = 0.008,
    weight_decay: WeightDecayOpt = 1e-4,
    bias_lr_factor: BiasLrFactorOpt = 1.0,
    warmup_epochs: WarmupOpt = 5.0,
    schedule: ScheduleOpt = "cosine",
    milestones: MilestonesOpt = "40,70",
    gamma: GammaOpt = 0.1,
    freeze_epochs: FreezeEpochsOpt = 0,
    flip_prob: FlipProbOpt = 0.5,
    pad: PadOpt = 10,
    erase_prob: EraseProbOpt = 0.5,
    erase_area: EraseAreaOpt = "0.02-0.4",
    erase_ratio: EraseRatioOpt = 0.3,
    erase_fill: EraseFillOpt = "grey",
    jitter_prob: JitterProbOpt = 0.0,
    jitter: JitterOpt = "0.15,0.15,0.1,0.1",
    drop_path: DropPathOpt = 0.1,
    label_smoothing: LabelSmoothingOpt = 0.0,
    margin: MarginOpt = None,
    top_n: TopNOpt = 8,
    rp_form: RpFormOpt = "stable",
    rp_weight: RpWeightOpt = 1.0,
    patch_weight: PatchWeightOpt = 1.0,
    ce_weight: CeWeightOpt = 1.0,
    triplet_weight: TripletWeightOpt = 1.0,
    center_weight: CenterWeightOpt = 0.0005,
    center_lr: CenterLrOpt = 0.5,
    neck_feat: NeckFeatOpt = "before",
    sie: SieOpt = False,
    sie_weight: SieWeightOpt = 3.0,
    jpm: JpmOpt = False,
    jpm_groups: JpmGroupsOpt = 4,
    jpm_shift: JpmShiftOpt = 4,
    jpm_shuffle: JpmShuffleOpt = 2,
    id_head: IdHeadOpt = "linear",
    head_scale: HeadScaleOpt = 64.0,
    head_margin: HeadMarginOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    precision: TrainPrecisionOpt = "auto",
    compile_: CompileOpt = False,
    compile_mode: Annotated[
        str, typer.Option(help="torch.compile mode: default, reduce-overhead, max-autotune-no-cudagraphs.")
    ] = "default",
    cuda_graph: CudaGraphOpt = True,
    init: Annotated[Path | None, typer.Option(help="timm-format ViT weights (.pth / .safetensors).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="timm model name to fetch weights from (online).")] = None,
    eval_every: EvalEveryOpt = 0,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --out from its last checkpoint, with the options in its config.json."),
    ] = False,
    print_model: Annotated[bool, typer.Option(help="Print the parameter summary and exit.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a ViT-ReID model; writes config.json, checkpoint.pt, metrics.jsonl, model.safetensors, curves.png.

    Examples:

      reid train --data data/market1501.h5 --out runs/rpe --pe rpe --loss ce+triplet

      reid train --data data/market1501.h5 --out runs/both-rp --pe both --loss rp-triplet --init vit_base_lup.pth

      reid train --data demo/synthetic.h5 --out runs/tiny --preset vit_tiny --dim 96 --depth 4 --epochs 10

      reid train --out runs/rpe --resume                 # the run's own options, from its config.json

      reid train --out runs/rpe --resume --epochs 160    # a longer run (the cosine schedule stretches)
    """
    from reidcli.engine.train import TrainConfig

    if resume and (out / "config.json").is_file() and not print_model:
        cfg = resumed_config(out, given_options(ctx))
        _report(run_training(cfg, resume), out, json_out)
        return
    if data is None:
        raise ConfigError("--data is missing: pass the dataset HDF5 from 'reid prepare'")
    check_out_folder(out)
    if not print_model:
        check_loss_options(ctx, [loss])
        refuse_unused(ctx, ("compile_mode",), compile_, "--compile", "add --compile")
    steps = schedule_options(ctx, schedule, milestones, gamma)
    size = parse_size(image_size) if image_size else dataset_image_size(data)
    if image_size and not print_model:
        check_image_size(size, data)
    extra = tuple(str(p) for p in extra_data or ())
    cameras = sie_cameras(ctx, sie, data, extra)
    local = jpm_options(ctx, jpm, jpm_groups, jpm_shift, jpm_shuffle)
    head = head_options(ctx, id_head, head_scale, head_margin)
    mcfg = model_options(
        pe, preset, dim, depth, heads, patch_size, stride, size, drop_path, neck_feat, cameras, sie_weight, local, head
    )
    if print_model:
        _print_model(mcfg, json_out, loss)
        return
    cfg = TrainConfig(
        data=str(data),
        run_dir=str(out),
        model=mcfg,
        extra_data=extra,
        combine_all=combine_all,
        loss=loss_options(loss, ctx.params),
        augment=augment_options(ctx),
        epochs=epochs,
        batch=batch,
        k=k,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        bias_lr_factor=bias_lr_factor,
        warmup_epochs=warmup_epochs,
        **steps,
        freeze_epochs=freeze_epochs,
        seed=seed,
        device=device,
        precision=precision,
        compile=compile_,
        compile_mode=compile_mode,
        cuda_graph=cuda_graph,
        init=str(init) if init else None,
        pretrained=pretrained,
        eval_every=eval_every,
    ).validate()
    _report(run_training(cfg, resume), out, json_out)


def _report(result, out: Path, json_out: bool) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    last = result.metrics[-1] if result.metrics else {}
    if json_out:
        print_json({"run": str(result.run_dir), "epochs": result.epochs_done, "last": last, "params": result.params})
        return
    rows = [(k_, v) for k_, v in last.items()]
    print_table(f"trained {out} ({result.epochs_done} epochs)", ["metric", "last epoch"], rows)


# Command-line options → fields of the saved config they set (for --resume).
_MODEL_OPTIONS = {
    o: o
    for o in (
        "pe",
        "dim",
        "depth",
        "heads",
        "patch_size",
        "stride",
        "drop_path",
        "neck_feat",
        "sie_weight",
        "jpm",
        "jpm_groups",
        "jpm_shift",
        "jpm_shuffle",
        "id_head",
        "head_scale",
        "head_margin",
    )
}
_LOSS_OPTIONS = {"loss": "spec"} | {o: o for o in LOSS_FIELDS}
_RUN_OPTIONS = {"compile_": "compile"} | {
    o: o
    for o in (
        "data",
        "extra_data",
        "combine_all",
        "epochs",
        "batch",
        "k",
        "optimizer",
        "lr",
        "weight_decay",
        "bias_lr_factor",
        "warmup_epochs",
        "schedule",
        "gamma",
        "freeze_epochs",
        "seed",
        "device",
        "precision",
        "compile_mode",
        "cuda_graph",
        "init",
        "pretrained",
        "eval_every",
    )
}


def resumed_config(out: Path, given: dict):
    """The run's own config.json with the given options on top; the engine refuses those that change the
    trajectory (model, loss, batch, optimiser, schedule, seed) and takes the rest (epochs, device, precision…)."""
    from dataclasses import replace

    from reidcli.engine.train import check_resumable, load_train_config
    from reidcli.model.vit import ModelConfig

    check_resumable(out)
    saved = load_train_config(out)
    model = {f: given[o] for o, f in _MODEL_OPTIONS.items() if o in given}
    if "preset" in given:
        base = ModelConfig.from_preset(given["preset"])
        model = {"dim": base.dim, "depth": base.depth, "heads": base.heads, **model}
    if "image_size" in given:
        model["image_size"] = parse_size(given["image_size"])
    loss = {f: given[o] for o, f in _LOSS_OPTIONS.items() if o in given}
    run = {f: given[o] for o, f in _RUN_OPTIONS.items() if o in given}
    run |= {f: str(run[f]) for f in ("data", "init") if run.get(f) is not None}
    if "milestones" in given:
        run["milestones"] = parse_milestones(given["milestones"])
    augment = _augment_fields(given)
    if "extra_data" in run:
        run["extra_data"] = tuple(str(p) for p in run["extra_data"] or ())
    if "sie" in given:  # compared as the camera count it resolves to
        extra = run.get("extra_data", saved.extra_data)
        model["sie_cameras"] = all_cameras(given.get("data") or saved.data, extra) if given["sie"] else 0
    if "data" not in run and not Path(saved.data).is_file():
        raise ConfigError(
            f"the dataset of {out} ({saved.data}, from its config.json) is not there from here; pass --data FILE"
        )
    gone = [p for p in run.get("extra_data", saved.extra_data) if not Path(p).is_file()]
    if gone:
        raise ConfigError(
            f"the --extra-data dataset {gone[0]} of {out} (from its config.json) is not there from here; put it back "
            "at that path (the joined datasets set the run's identities)"
        )
    return replace(
        saved,
        model=replace(saved.model, **model),
        loss=replace(saved.loss, **loss),
        augment=replace(saved.augment, **augment),
        run_dir=str(out),
        **run,
    ).validate(weights_file=False)  # the checkpoint's weights replace --init's: a moved --init file does not matter


def run_training(cfg, resume: bool):
    """Training with a Rich progress bar (steps of the current epoch, epochs in the label)."""
    from reidcli.engine.train import train as train_run

    with progress("train") as update:

        def on_epoch(row: dict) -> None:
            err.log(
                f"epoch {row['epoch']}/{cfg.epochs}  loss {row['loss']:.4f}  {row['images_per_s']:.0f} img/s"
                + (f"  mAP {row['eval_mAP']:.4f}" if "eval_mAP" in row else "")
                + ("  (head only: backbone frozen)" if row.get("backbone_frozen") else "")
            )

        return train_run(cfg, resume=resume, on_epoch=on_epoch, on_step=update)


def _print_model(mcfg, json_out: bool, loss: str) -> None:
    from reidcli.losses.combined import LossConfig
    from reidcli.model.vit import ViTReID, flop_report, parameter_report

    model = ViTReID(mcfg)
    report = {**parameter_report(model), **flop_report(model, LossConfig(spec=loss).reads_patches)}
    if json_out:
        print_json({"model": mcfg.to_dict(), **report})
        return
    rows = [
        ("total", report["total"], "100%"),
        ("APE", report["ape"], f"{report['ape'] / report['total']:.3%}"),
        ("RPE", report["rpe"], f"{report['rpe'] / report['total']:.3%}"),
    ]
    if mcfg.jpm:
        rows.append((f"JPM ({mcfg.jpm_groups} groups)", report["jpm"], f"{report['jpm'] / report['total']:.3%}"))
    if "sie" in report:
        rows.append((f"SIE ({mcfg.sie_cameras} cameras)", report["sie"], f"{report['sie'] / report['total']:.3%}"))
    print_table(
        f"{mcfg.pe} ViT, {mcfg.depth}×{mcfg.dim}, {mcfg.heads} heads, grid {report['grid']}",
        ["parameters", "count", "share"],
        rows,
    )
    stdout.print(
        f"{report['forward_gflop']:.2f} GFLOP per image at test time (forward; flip averaging doubles it), "
        f"{report['train_gflop']:.2f} per image per training step (forward + backward)"
    )


def register(app: typer.Typer) -> None:
    app.command()(train)
