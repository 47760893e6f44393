"""``reid compare``: is model B's mAP really above model A's? A paired bootstrap over the queries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import out, print_json, print_table
from reidcli.cli.options import JsonOpt


def compare(
    evaluations: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more evaluations of the same queries and gallery: 'reid evaluate --out' folders or their "
            "per_query.csv. The first (A) is the baseline every other is compared with.",
            show_default=False,
        ),
    ],
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of the queries.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Compare two evaluations of the same queries: mAP, Rank-1 and mINP of each, the difference B − A with a
    95% paired-bootstrap interval over queries and its p-value, and how many queries each model does better.
    With more than two, each is compared with the first, and the p-values are Holm-adjusted for the number of
    comparisons.

    Examples:

      reid evaluate feats/ape.h5 --out results/ape && reid evaluate feats/rpe.h5 --out results/rpe

      reid compare results/ape results/rpe

      reid compare results/ape/per_query.csv results/rpe/per_query.csv --json

      reid compare results/ape results/rpe results/both results/sincos
    """
    from reidcli.errors import ConfigError
    from reidcli.report.compare import compare as run_compare
    from reidcli.report.compare import holm, read_per_query

    if len(evaluations) < 2:
        raise ConfigError("give at least two evaluations to compare (the first is the baseline)")
    tables = [read_per_query(p) for p in evaluations]
    results = [run_compare(tables[0], t, resamples, seed) for t in tables[1:]]
    if len(results) == 1:
        _print_pair(results[0], json_out)
        return
    adjusted = {k: holm([r.rows[k]["p"] for r in results]) for k in range(len(results[0].rows))}
    if json_out:
        comparisons = []
        for i, (path, r) in enumerate(zip(evaluations[1:], results, strict=True)):
            rows = [{**row, "p_holm": adjusted[k][i]} for k, row in enumerate(r.rows)]
            comparisons.append({"evaluation": str(path), **r.to_dict(), "metrics": rows})
        print_json({"baseline": str(evaluations[0]), "comparisons": comparisons})
        return
    base = results[0].rows
    table = [(f"A: {evaluations[0]}", f"{100 * base[0]['A']:.2f}", "", "", f"{100 * base[1]['A']:.2f}", "", "")]
    for i, (path, r) in enumerate(zip(evaluations[1:], results, strict=True)):
        m, r1 = r.rows[0], r.rows[1]
        table.append(
            (
                str(path),
                f"{100 * m['B']:.2f}",
                f"{100 * m['delta']:+.2f} [{100 * m['low']:+.2f}, {100 * m['high']:+.2f}]",
                f"{adjusted[0][i]:.4f}",
                f"{100 * r1['B']:.2f}",
                f"{100 * r1['delta']:+.2f} [{100 * r1['low']:+.2f}, {100 * r1['high']:+.2f}]",
                f"{adjusted[1][i]:.4f}",
            )
        )
    columns = ["evaluation", "mAP", "− A (95%)", "p (Holm)", "Rank-1", "− A (95%)", "p (Holm)"]
    print_table(f"each against A over {results[0].queries} queries", columns, table)
    out.print(
        f"{results[0].resamples} paired bootstrap resamples of the queries; p-values Holm-adjusted for "
        f"{len(results)} comparisons (mINP in --json)."
    )


def _print_pair(result, json_out: bool) -> None:
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
