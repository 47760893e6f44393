"""The ``reid`` Typer app and its single error boundary."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated

import typer

from reidcli import __version__
from reidcli.errors import ReidError

__all__ = ["app", "main"]

app = typer.Typer(
    name="reid",
    help="Person re-identification with Vision Transformers: prepare → train → extract → index → evaluate, "
    "and ablate positional encodings (absolute, relative, both).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"reidcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _register() -> None:
    from reidcli.cli import (
        ablate,
        compare,
        doctor,
        evaluate,
        export,
        extract,
        import_,
        index,
        plot,
        prepare,
        search,
        train,
    )

    for module in (prepare, train, import_, extract, index, search, evaluate, compare, ablate, plot, export, doctor):
        module.register(app)


_register()


def _interrupted(signum, frame) -> None:
    """SIGINT and SIGTERM unwind the stack (temporary files are removed on the way) after one line of notice."""
    print(
        f"Error: interrupted ({signal.Signals(signum).name}); finished outputs are intact, rerun (train: --resume) "
        "to continue",
        file=sys.stderr,
        flush=True,
    )
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: ``Error: …`` on stderr and exit 1 for user errors, traceback only with --debug."""
    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        app()
    except ReidError as e:
        if debug:
            raise
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # the file system said no: a file where a folder is expected, permissions, a full disk
        if debug:
            raise
        from reidcli.fileio import os_error_text

        print(f"Error: {os_error_text(e)}; check that path (and the free disk space)", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 — the boundary: a bug still gets one line, the traceback with --debug
        if debug:
            raise
        print(f"Error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
