"""``reid compare``: is model B's mAP really above model A's? A paired bootstrap over the queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import out, print_json, print_table
from reidcli.cli.options import JsonOpt


def compare(
    a: Annotated[Path, typer.Argument(help="Evaluation A: 'reid evaluate --out' folder or its per_query.csv.")],
    b: Annotated[Path, typer.Argument(help="Evaluation B, of the same queries and gallery.")],
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of the queries.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Compare two evaluations of the same queries: mAP, Rank-1 and mINP of each, the difference B − A with a
    95% paired-bootstrap interval over queries and its p-value, and how many queries each model does better.

    Examples:

      reid evaluate feats/ape.h5 --out results/ape && reid evaluate feats/rpe.h5 --out results/rpe

      reid compare results/ape results/rpe

      reid compare results/ape/per_query.csv results/rpe/per_query.csv --json
    """
    from reidcli.report.compare import compare as run_compare
    from reidcli.report.compare import read_per_query

    result = run_compare(read_per_query(a), read_per_query(b), resamples, seed)
    if json_out:
        print_json(result.to_dict())
        return
    rows = [
        (
            r["metric"],
            f"{100 * r['A']:.2f}",
            f"{100 * r['B']:.2f}",
            f"{100 * r['delta']:+.2f}",
            f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]",
            f"{r['p']:.4f}",
        )
        for r in result.rows
    ]
    print_table(f"B − A over {result.queries} queries", ["metric", "A", "B", "B − A", "95% interval", "p"], rows)
    out.print(
        f"{result.resamples} paired bootstrap resamples of the queries; B's AP is higher on {result.better} "
        f"queries, lower on {result.worse}."
    )


def register(app: typer.Typer) -> None:
    app.command()(compare)
