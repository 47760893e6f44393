"""Shared fixtures: small synthetic datasets prepared once per session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# A one-block ViT that trains in a fraction of a second on the tiny dataset: CLI arguments for train / ablate.
TINY_MODEL = tuple(["--dim", "32", "--depth", "1", "--heads", "4"])
TINY_TRAIN = (*TINY_MODEL, *["--batch", "16", "--optimizer", "adamw", "--lr", "1e-3", "--device", "cpu"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 + 12 identities at 64×32: enough for shapes, formats and a few training steps."""
    from reidcli.data.prepare import PrepareConfig, prepare_dataset
    from reidcli.data.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("tiny")
    generate_synthetic(
        root / "raw",
        SyntheticConfig(num_train_ids=12, num_test_ids=12, num_distractors=6, num_junk=3, images_per_camera=2, seed=1),
    )
    out = root / "tiny.h5"
    prepare_dataset(PrepareConfig(dataset="synthetic", root=root / "raw", out=out, image_size=(64, 32)))
    return out


def run_cli(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real ``reid`` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "reidcli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """The real ``reid`` entry point (``main``: Typer app and error boundary) in this process, for refusals that end
    before any work: the same exit code, stdout and stderr (warnings logged as the app logs them) as
    :func:`run_cli`, without a new interpreter importing torch and timm (about 4 s a call). Python warnings are
    shown under the interpreter's default filters, as a subprocess would print them (pytest would only record them)."""
    import contextlib
    import io
    import logging
    import signal
    import warnings

    from reidcli.cli.app import main

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root, handlers = logging.getLogger(), (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    argv, code = sys.argv, 0
    root.addHandler(handler)
    sys.argv = ["reid", *args]
    try:
        outputs = contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr)
        with outputs[0], outputs[1], warnings.catch_warnings(record=True) as shown:
            warnings.resetwarnings()  # the interpreter's own defaults, not pytest's
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                main()
            finally:
                for w in shown:
                    stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        root.removeHandler(handler)
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return subprocess.CompletedProcess(["reid", *args], code, stdout.getvalue(), stderr.getvalue())


def train_tiny_run(data: Path, run: Path, pe: str, *args: str) -> Path:
    """A one-block, one-epoch run folder trained through the real CLI (for tests that need a finished run)."""
    r = run_cli("train", "--data", str(data), "--out", str(run), "--pe", pe, *TINY_MODEL, "--batch", "16", *args)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="session")
def both_run(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, run): a `both` run trained through the CLI, and its query/gallery features in folder / "f.h5" from
    'reid extract' (shared by the tests of search and export)."""
    root = tmp_path_factory.mktemp("both")
    run = train_tiny_run(tiny_data, root / "run", "both", "--device", "cpu")
    r = run_cli("extract", "--run", str(run), "--data", str(tiny_data), "--out", str(root / "f.h5"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return root, run
