"""``reid extract``: embed query/gallery images with a trained model into a features HDF5."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table
from reidcli.cli.options import DataOpt, DeviceOpt, JsonOpt, parse_list


def extract(
    run: Annotated[Path, typer.Option(help="Run folder from 'reid train'.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Features HDF5 to write.")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits to embed.")] = "query,gallery",
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    flip: Annotated[bool, typer.Option(help="Average with the horizontally flipped image.")] = True,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, or float16 (half the size).")] = "float32",
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="Forward precision: auto (GPU fp16, CPU fp32), fp16 (GPU), bf16 (autocast; CPU too, ~1.6x) or fp32."
        ),
    ] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the forward (large splits).")] = False,
    cuda_graph: Annotated[
        bool, typer.Option(help="GPU: replay each batch as one CUDA graph (eager launches if capture fails).")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Embed every image of the chosen splits (dataset order), L2-normalised, with provenance attributes.

    Examples:

      reid extract --run runs/rpe --data data/market1501.h5 --out feats/rpe.h5

      reid extract --run runs/rpe --data data/market1501.h5 --out feats/rpe16.h5 --dtype float16 --no-flip

      reid extract --run runs/rpe --data data/market1501.h5 --out feats/rpe.h5 --device cpu --precision bf16
    """
    from reidcli.engine.extract import ExtractConfig, extract_features

    cfg = ExtractConfig(
        run=str(run),
        data=str(data),
        out=str(out),
        splits=tuple(parse_list(splits)),
        batch=batch,
        flip=flip,
        dtype=dtype,
        device=device,
        precision=precision,
        compile=compile_,
        cuda_graph=cuda_graph,
    ).validate()
    with err.status(f"embedding {', '.join(cfg.splits)}"):
        counts = extract_features(cfg)
    if json_out:
        print_json({"out": str(out), "rows": counts})
        return
    print_table(f"features → {out}", ["split", "rows"], list(counts.items()))


def register(app: typer.Typer) -> None:
    app.command()(extract)
