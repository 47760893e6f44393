"""Option aliases shared by several commands, and small parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.errors import ConfigError

__all__ = ["JsonOpt", "DeviceOpt", "DataOpt", "parse_size", "parse_list"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Dataset HDF5 from 'reid prepare'.")]


def parse_size(text: str) -> tuple[int, int]:
    """``'256x128'`` → ``(256, 128)`` (height × width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 256x128") from None
    if h < 1 or w < 1:
        raise ConfigError(f"size {text!r} must be positive")
    return h, w


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
