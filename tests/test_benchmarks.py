"""The benchmark scripts run end to end at toy sizes, so they work when a GPU session runs them for real."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )


def test_gpu_bench_smoke(tmp_path):
    r = _run("benchmarks.gpu_bench", "--smoke", "--no-compile", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    for section in ("train", "epoch", "extract", "eval"):
        assert "error" not in result[section], result[section]
    for size in ("market", "msmt17", "market500k"):
        assert result["eval"][f"{size} gpu-cpu max metric diff"] < 1e-6
        assert result["eval"][f"{size} fp16 gpu-cpu max metric diff"] < 1e-6
        assert result["eval"][f"eval {size} sort ms"] > 0 and result["eval"][f"eval {size} fp16-features ms"] > 0
    assert result["epoch"]["graph"]["epoch2_s"] > 0 and "eval market ms" in r.stdout
    assert result["train"]["graph equivalence"]["graph-eager distance / moved"] < 1e-3
    assert (
        result["train"]["train both b64 jpm"]["loss_finite"]
        and result["train"]["train both b64 graph sie+jpm"]["loss_finite"]
        and result["train"]["train both b64 graph circle"]["loss_finite"]
    )
    for row in ("center", "frozen", "noise-erasing", "colour-jitter"):  # prepared GPU rows: they must at least run
        assert result["train"][f"train both b64 graph {row}"]["loss_finite"], result["train"][
            f"train both b64 graph {row}"
        ]
    assert (tmp_path / "profile_train_both.txt").is_file() and (tmp_path / "profile_extract_ape_fp16.txt").is_file()
    assert result["extract"]["extract both fp16 model-only"] > 0
    assert (
        result["extract"]["extract ape fp16 streamed from HDF5"] > 0
        and result["extract"]["extract ape fp16 from memory"] > 0
    )
    assert result["eval"]["aqe market ms"] > 0 and result["eval"]["aqe market gpu-cpu mAP diff"] < 1e-6
    assert result["eval"]["roc market ms"] > 0 and result["eval"]["roc market gpu-cpu max TPR diff"] < 1e-6


def test_model_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    r = _run(
        "benchmarks.model_speed",
        "--preset",
        "vit_tiny",
        "--image-size",
        "64x32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--pe",
        "ape,rpe",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["pe"] for row in rows] == ["ape", "rpe"] and all(
        row["train_img_s"] > 0 and row["train_every_token_img_s"] > 0 for row in rows
    )


def test_onnx_cpu_smoke(tmp_path):
    out = tmp_path / "onnx.json"
    r = _run("benchmarks.onnx_cpu", "--smoke", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["models"].values()
    assert row["onnxruntime img/s"] > 0 and row["reidcli fp32 img/s"] > 0
    assert row["max |onnxruntime - reidcli fp32|"] < 1e-4 and "onnxruntime" in r.stdout


def test_cpu_eval_market_size_counting_methods_agree():
    """The CPU benchmark's evaluators run at Market size, and the default counting (the scan) equals the torch
    methods'."""
    maps = []
    for who in ("ours", "ours_count", "ours_sort"):
        r = _run("benchmarks.cpu_eval", "--one", who, "--noise", "3.0")
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout)
        assert 0 < res["best_s"] <= res["first_s"] * 3
        maps.append(res["mAP"])
    assert maps[0] == maps[1] == maps[2] and 0.25 < maps[0] < 0.4


def test_last_block_ab_smoke(tmp_path):
    out = tmp_path / "last_block.json"
    r = _run("benchmarks.last_block", "--rounds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"demo 4x128 ape", "demo 4x128 both", "vit_tiny both 256x128"}
    for row in rows.values():
        assert row["train_cls_only_img_s"] > 0 and row["infer_every_token_img_s"] > 0 and row["train_speedup"] > 0


def test_prepare_memory_smoke(tmp_path):
    out = tmp_path / "prepare.json"
    r = _run("benchmarks.prepare_memory", "--gallery", "600", "--size", "32x16", "--ids", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["gallery_files"] == 600 and 0 < result["images"]["gallery"] <= 600
    assert 0 < result["peak_rss_gb"] < 4 and result["wall_s"] > 0
