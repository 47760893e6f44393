"""``reid plot``: the pictures of one trained run (curves, position maps, the RP loss's patches and relations)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, out, print_json, print_table
from reidcli.cli.options import JsonOpt, check_out_folder


def plot(
    run: Annotated[Path, typer.Argument(help="Run folder from 'reid train' (or one of 'reid ablate's runs).")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the PNGs (default: RUN/pictures).")] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset HDF5 for the relation-vector picture (default: the run's own)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Draw the pictures of one trained run: training curves; the APE cosine-similarity grid (ape, sincos, both);
    the RPE bias maps per layer and head (rpe, both); and the relative-position triplet's view of three training
    images (anchor, positive, negative): the top-N patches it picks and the positional relations of their pairs.

    Examples:

      reid plot runs/both

      reid plot runs/both --out figures/both --data data/market1501.h5
    """
    from reidcli.engine.checkpoint import read_run_config
    from reidcli.errors import ConfigError
    from reidcli.report.figures import PICTURES, run_pictures

    read_run_config(run)  # a run folder, or one line saying what it is not
    if data is not None and not data.is_file():
        raise ConfigError(f"--data {data} does not exist; pass the dataset HDF5 from 'reid prepare'")
    folder = check_out_folder(out_dir if out_dir is not None else run / "pictures")
    with err.status("drawing"):
        written, skipped = run_pictures(run, folder, data)
    if json_out:
        print_json({"out": str(folder), "pictures": [str(p) for p in written], "skipped": skipped})
        return
    rows = [(p.name, PICTURES.get(p.stem, "")) for p in written]
    print_table(f"pictures → {folder}", ["picture", "shows"], rows)
    for line in skipped:
        out.print(f"skipped {line}")


def register(app: typer.Typer) -> None:
    app.command()(plot)
