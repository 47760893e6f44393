"""Rich output: tables on stdout, progress and notices on stderr, JSON for machines."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["out", "err", "progress", "print_table", "print_json", "fmt"]

out = Console(highlight=False)
if not out.is_terminal:  # piped or logged: wide enough that tables keep one line per row
    out = Console(highlight=False, width=160)
err = Console(stderr=True, highlight=False)


@contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yield ``update(done, total)``; shows a bar with ETA on stderr (nothing when stderr is not a terminal)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=total)

        def update(done: int, total_: int) -> None:
            bar.update(task, completed=done, total=total_)

        yield update


def fmt(v: object, digits: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        # a late learning rate (1.6e-05) would print as 0.0000
        return f"{v:.{digits - 1}e}" if 0 < abs(v) < 10 ** -(digits - 1) else f"{v:.{digits}f}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], highlight: dict | None = None):
    """A Rich table; ``highlight`` maps a column index to the row index whose cell is the best (bold green)."""
    table = Table(title=escape(title), title_justify="left")
    for i, c in enumerate(columns):
        numeric = i > 0 and all(isinstance(r[i], (int, float)) for r in rows)
        table.add_column(c, justify="right" if numeric else "left")
    for r, row in enumerate(rows):
        cells = []
        for c, v in enumerate(row):
            text = escape(fmt(v))  # paths and messages are data, not Rich markup
            if highlight and highlight.get(c) == r:
                text = f"[bold green]{text}[/]"
            cells.append(text)
        table.add_row(*cells)
    out.print(table)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
