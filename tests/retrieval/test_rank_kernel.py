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


@pytest.mark.parametrize("width", [16, 64, 256, 512])
def test_kernel_compiles_for_hopper_without_register_spills(width):
    """Triton compiles the kernel for sm_90a here without a GPU (its own ptxas): type and layout errors the
    interpreter would not see fail here, and ptxas must report no spills at a register count that lets several
    programs share an SM (the kernel streams the scores: occupancy is its bandwidth)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton wheel carries no ptxas")
    from reidcli.retrieval.rank_kernel import _rank_rows, launch_sizes

    ptr = {"scores_ptr": "*fp32", "ranks_ptr": "*i64", "num_pos_ptr": "*i64", "num_valid_ptr": "*i64"}
    ints = {"stride_s": "i64", "stride_ranks": "i64", "num_gallery": "i32"}
    longs = ("order_ptr", "lo_ptr", "count_ptr", "g_pid_ptr", "g_cam_ptr", "q_pid_ptr", "q_cam_ptr")
    signature = {name: ptr.get(name) or ints.get(name) or "*i64" for name in _rank_rows.arg_names}
    assert set(longs) <= set(signature)
    sizes = launch_sizes(width)
    signature.update({k: "constexpr" for k in sizes})
    kernel = triton.compile(ASTSource(_rank_rows, signature, constexprs=sizes), target=GPUTarget("cuda", 90, 32))
    ptx = Path(os.environ.get("TMPDIR", "/tmp")) / f"rank_kernel_{width}_{os.getpid()}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    try:
        info = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        ptx.unlink()
    report = info.stdout + info.stderr
    assert info.returncode == 0, report
    regs = int(report.split("Used ")[1].split(" registers")[0])
    assert "0 bytes spill stores" in report and regs <= 128, report
