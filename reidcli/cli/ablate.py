"""``reid ablate``: the APE / RPE / both comparison (and losses, seeds) in one table with pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, progress
from reidcli.cli.console import out as console
from reidcli.cli.options import (
    LOSS_OPTION_NEEDS,
    BatchOpt,
    BiasLrFactorOpt,
    CenterLrOpt,
    CenterWeightOpt,
    CeWeightOpt,
    CompileOpt,
    CudaGraphOpt,
    DataOpt,
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
)
from reidcli.errors import ConfigError


def ablate(
    ctx: typer.Context,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Ablation folder: runs/, results.csv, results.md, pictures/.")],
    pe: Annotated[str, typer.Option(help="Comma-separated encodings: none, ape, sincos, rpe, both.")] = "ape,rpe,both",
    extra_data: ExtraDataOpt = None,
    loss: Annotated[str, typer.Option(help="Comma-separated loss specs, e.g. ce+triplet,rp-triplet.")] = "ce+triplet",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    vary: Annotated[
        list[str] | None,
        typer.Option(
            help="OPTION=V1,V2,… : one variant per value of a training option (e.g. rp-weight=0.5,1,2, lr=1e-3,3e-4); "
            "repeatable (every combination)."
        ),
    ] = None,
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
    top_n: TopNOpt = 8,
    rp_form: RpFormOpt = "stable",
    rp_weight: RpWeightOpt = 1.0,
    patch_weight: PatchWeightOpt = 1.0,
    ce_weight: CeWeightOpt = 1.0,
    triplet_weight: TripletWeightOpt = 1.0,
    center_weight: CenterWeightOpt = 0.0005,
    center_lr: CenterLrOpt = 0.5,
    label_smoothing: LabelSmoothingOpt = 0.0,
    margin: MarginOpt = None,
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
    init: Annotated[Path | None, typer.Option(help="timm-format ViT weights every run starts from.")] = None,
    perturb: Annotated[float, typer.Option(help="Query misalignment for the robustness column (0: off).")] = 0.1,
    test_data: Annotated[
        list[Path] | None,
        typer.Option(
            help="Another prepared dataset each variant is also evaluated on (its query and gallery; direct "
            "transfer, e.g. Market → Duke): a column 'mAP → NAME'; repeatable. Finished runs are only evaluated."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: TrainPrecisionOpt = "auto",
    compile_: CompileOpt = False,
    cuda_graph: CudaGraphOpt = True,
    eval_every: EvalEveryOpt = 0,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (and which runs are reused) and exit.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train → extract → evaluate every variant and compare them in one table (mean ± std over seeds).

    Finished runs are reused (keyed by their resolved config); an interrupted ablation continues where it stopped.

    Examples:

      reid ablate --data data/market1501.h5 --out ablations/pe --pe ape,rpe,both --seeds 0,1,2

      reid ablate --data data/market1501.h5 --out ablations/loss --pe both --loss ce+triplet,rp-triplet

      reid ablate --data data/market1501.h5 --out ablations/rpw --pe both --loss rp-triplet --vary rp-weight=0.5,1,2

      reid ablate --data data/market1501.h5 --out ablations/pe --pe ape,rpe,both --test-data data/dukemtmcreid.h5

      reid ablate --data demo/synthetic.h5 --out demo/ablation --preset vit_tiny --dim 96 --depth 4 --epochs 8 --dry-run
    """
    from reidcli.cli.train import (
        augment_options,
        check_image_size,
        dataset_image_size,
        head_options,
        jpm_options,
        loss_options,
        model_options,
        schedule_options,
        sie_cameras,
    )
    from reidcli.engine.train import TrainConfig
    from reidcli.report.ablate import AblationConfig, parse_vary, plan, run_ablation

    pes, losses = tuple(parse_list(pe)), tuple(parse_list(loss))
    check_loss_options(ctx, list(losses))
    sweeps = tuple(parse_vary(v) for v in vary or ())
    _check_swept_losses([option for option, _ in sweeps], list(losses))
    typed = given_options(ctx)
    both = [option for option, _ in sweeps if option.replace("-", "_") in typed]
    if both:
        raise ConfigError(f"--{both[0]} is set per variant by --vary {both[0]}; leave --{both[0]} out")
    try:
        seed_list = tuple(int(s) for s in parse_list(seeds))
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    size = parse_size(image_size) if image_size else dataset_image_size(data)
    if image_size:
        check_image_size(size, data)
    extra = tuple(str(p) for p in extra_data or ())
    cameras = sie_cameras(ctx, sie, data, extra)
    local = jpm_options(ctx, jpm, jpm_groups, jpm_shift, jpm_shuffle)
    head = head_options(ctx, id_head, head_scale, head_margin)
    steps = schedule_options(ctx, schedule, milestones, gamma, swept=any(o == "schedule" for o, _ in sweeps))
    first = pes[0] if pes else "ape"
    mcfg = model_options(
        first,
        preset,
        dim,
        depth,
        heads,
        patch_size,
        stride,
        size,
        drop_path,
        neck_feat,
        cameras,
        sie_weight,
        local,
        head,
    )
    template = TrainConfig(
        data=str(data),
        run_dir="",
        model=mcfg,
        extra_data=extra,
        loss=loss_options("ce+triplet", ctx.params),
        augment=augment_options(ctx, swept=tuple(option for option, _ in sweeps)),
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
        device=device,
        precision=precision,
        compile=compile_,
        cuda_graph=cuda_graph,
        eval_every=eval_every,
        init=str(init) if init else None,
    )
    _check_swept_model(template, [option for option, _ in sweeps])
    out = check_out_folder(out)
    cfg = AblationConfig(
        out=str(out),
        template=template,
        pes=pes,
        losses=losses,
        seeds=seed_list,
        perturb=perturb,
        vary=sweeps,
        test_data=tuple(str(p) for p in test_data or ()),
    ).validate()
    if dry_run:
        _print_plan(plan(cfg), json_out, cfg.test_data)
        return
    with progress("ablate") as update:
        summary = run_ablation(
            cfg, on_variant=lambda i, n, v: err.log(f"variant {i + 1}/{n}: {v.label} seed {v.seed}"), on_step=update
        )
    if json_out:
        print_json(summary)
        return
    _print_summary(summary, out)


def _check_swept_losses(options: list[str], specs: list[str]) -> None:
    """Refuse a ``--vary`` of a loss option none of the ``--loss`` specs uses (its variants would be one model)."""
    from reidcli.losses.combined import parse_loss_spec

    used = {name for spec in specs for name in parse_loss_spec(spec)}
    for option in options:
        needs = LOSS_OPTION_NEEDS.get(option.replace("-", "_"), ())
        if needs and not used & set(needs):
            wanted = " or ".join(needs)
            raise ConfigError(
                f"--vary {option} has no effect without {wanted} in --loss: every variant would train the same "
                f"model; add {wanted} to --loss"
            )


def _check_swept_model(template, options: list[str]) -> None:
    """Refuse a ``--vary`` of an option the template's model or optimiser ignores (every variant would be alike)."""
    m = template.model
    needs = {
        "head-scale": (m.id_head != "linear", "a cosine --id-head", "add --id-head cosface, arcface or circle"),
        "head-margin": (m.id_head != "linear", "a cosine --id-head", "add --id-head cosface, arcface or circle"),
        "sie-weight": (bool(m.sie_cameras), "--sie", "add --sie"),
        "momentum": (template.optimizer == "sgd", "--optimizer sgd", "use --optimizer sgd"),
        "gamma": (template.schedule == "step", "--schedule step", "add --schedule step"),
        **{
            f"erase-{o}": (template.augment.erase > 0, "--erase-prob above 0", "raise --erase-prob")
            for o in ("area", "ratio", "fill")
        },
        **{f"jpm-{o}": (m.jpm, "--jpm", "add --jpm") for o in ("groups", "shift", "shuffle")},
    }
    if "gamma" in options and "schedule" in options:
        raise ConfigError(
            "--vary gamma with --vary schedule trains each cosine variant once per gamma (cosine has none); sweep "
            "gamma with --schedule step instead"
        )
    for option in options:
        ok, what, fix = needs.get(option, (True, "", ""))
        if not ok:
            raise ConfigError(f"--vary {option} has no effect without {what}: every variant would be alike; {fix}")


def _print_plan(variants, json_out: bool, test_data: tuple[str, ...] = ()) -> None:
    from reidcli.cli.console import print_table
    from reidcli.engine.checkpoint import RunFiles
    from reidcli.report.ablate import CROSS, cross_name

    rows = []
    for v in variants:
        files = RunFiles(v.run_dir)
        state = "reuse" if files.done.is_file() else "resume" if files.checkpoint.is_file() else "train"
        cached = v.run_dir / "results.json"
        if state == "reuse" and test_data:  # a finished run is evaluated on the --test-data it has no numbers for
            done = json.loads(cached.read_text()) if cached.is_file() else {}
            new = [cross_name(p) for p in test_data if CROSS[0] + cross_name(p) not in done]
            state += f" + evaluate on {', '.join(new)}" if new else ""
        rows.append({"variant": v.label, "seed": v.seed, "action": state, "run": str(v.run_dir)})
    if json_out:
        print_json(rows)
        return
    print_table("ablation plan", ["variant", "seed", "action", "run"], [tuple(r.values()) for r in rows])


def _print_summary(summary: list[dict], out: Path) -> None:
    from rich.table import Table

    from reidcli.report.ablate import CROSS, format_cell, table_columns

    cols = table_columns(summary)
    higher_better = {"mAP", "Rank-1", "Rank-5", "Rank-10", "mINP", "mAP shifted", "train img/s"}
    higher_better |= {c for c in cols if c.startswith(CROSS)}
    best = {c: max(range(len(summary)), key=lambda i: summary[i][c]) for c in cols if c in higher_better}
    if "final loss" in cols:
        best["final loss"] = min(range(len(summary)), key=lambda i: summary[i]["final loss"])
    table = Table(title=f"ablation → {out} (metrics in %)", title_justify="left")
    for c in cols:
        table.add_column(c, justify="left" if c == "variant" else "right")
    for i, r in enumerate(summary):
        table.add_row(
            *[
                f"[bold green]{format_cell(r, c)}[/]" if best.get(c) == i and len(summary) > 1 else format_cell(r, c)
                for c in cols
            ]
        )
    console.print(table)
    if "ΔmAP" in cols:
        over = "the seeds and the queries" if max(r.get("runs", 1) for r in summary) > 1 else "the queries"
        console.print(f"ΔmAP: against {summary[0]['variant']}, with a 95% paired-bootstrap interval over {over}")
    console.print(f"tables: {out / 'results.csv'}, {out / 'results.md'}; pictures: {out / 'pictures'}")


def register(app: typer.Typer) -> None:
    app.command()(ablate)
