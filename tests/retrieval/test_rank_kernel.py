"""The GPU's Triton ranking kernel, run by Triton's interpreter on the CPU in its own process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_ranks_equal_torch_methods_and_reference():
    pytest.importorskip("triton")  # ships with torch's Linux wheels; absent only where torch has no GPU build
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/retrieval/kernel_cases.py")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    for case in ("market-like", "ties, ±0, duplicates", "all equal", "wide gallery", "strided view", "evaluate"):
        assert f"ok {case}" in run.stdout
