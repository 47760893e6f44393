import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest

from tests.conftest import TINY_MODEL, run_cli, run_cli_here

COMMANDS = (
    "prepare",
    "train",
    "import",
    "extract",
    "index",
    "search",
    "evaluate",
    "compare",
    "ablate",
    "plot",
    "export",
    "doctor",
)


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys; from reidcli.cli.app import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); print(r.output); "
        f"[CliRunner().invoke(app, [c, '--help']) for c in {COMMANDS!r}]; "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NO-TORCH" in out
    for c in COMMANDS:
        assert c in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_an_example(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "Examples" in r.stdout and f"reid {command}" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("reidcli ")


def test_error_boundary_and_debug(tmp_path):
    r = run_cli("evaluate", str(tmp_path / "none.h5"))
    assert (
        r.returncode == 1
        and r.stderr.strip() == f"Error: features file {tmp_path / 'none.h5'} not found; create it with 'reid extract'"
    )
    r = run_cli("--debug", "evaluate", str(tmp_path / "none.h5"))
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.slow
def test_end_to_end_pipeline_learns(tmp_path):
    """prepare → train → extract → index → evaluate through the real CLI; the model must beat chance by far."""
    h5 = tmp_path / "syn.h5"
    steps = [
        (
            "prepare",
            "synthetic",
            "--root",
            str(tmp_path / "raw"),
            "--out",
            str(h5),
            "--ids",
            "100",
            "--image-size",
            "128x64",
            "--seed",
            "2",
        ),
        (
            "train",
            "--data",
            str(h5),
            "--out",
            str(tmp_path / "run"),
            "--pe",
            "ape",
            "--preset",
            "vit_tiny",
            "--dim",
            "128",
            "--depth",
            "4",
            "--heads",
            "4",
            "--epochs",
            "9",
            "--batch",
            "32",
            "--optimizer",
            "adamw",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.05",
            "--warmup-epochs",
            "1",
            "--pad",  # no padding learns the synthetic people ~2.5× faster: 9 epochs give mAP 0.22 (25 epochs with
            "0",  # --pad 10: 0.30), 15× chance, in a third of the time (30 s, 2-core Xeon)
            "--drop-path",
            "0",
            "--device",
            "cpu",
            "--neck-feat",
            "after",
        ),
        ("extract", "--run", str(tmp_path / "run"), "--data", str(h5), "--out", str(tmp_path / "f.h5")),
        ("index", str(tmp_path / "f.h5"), "--out", str(tmp_path / "g.faiss")),
    ]
    for step in steps:
        r = run_cli(*step)
        assert r.returncode == 0, (step[0], r.stderr[-2000:])
    r = run_cli(
        "evaluate",
        str(tmp_path / "f.h5"),
        "--index",
        str(tmp_path / "g.faiss"),
        "--json",
        "--out",
        str(tmp_path / "eval"),
        "--visualize",
        "3",
        "--data",
        str(h5),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"mAP", "mINP", "cmc", "num_valid_queries", "seconds"} <= res.keys()
    assert 0 <= res["mINP"] <= res["mAP"] <= 1 and res["cmc"][0] <= res["cmc"][4] <= 1
    assert res["mAP"] > 5 * res["chance_mAP"], res
    assert (tmp_path / "eval" / "ranked_lists.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["mAP"] == res["mAP"] and saved["features"] == str(tmp_path / "f.h5") and saved["rerank"] is None
    assert saved["run"] == str(tmp_path / "run") and len(saved["checkpoint_sha256"]) == 64  # what was evaluated
    per_query = pd.read_csv(tmp_path / "eval" / "per_query.csv")
    assert len(per_query) == res["num_queries"] and per_query["AP"].notna().sum() == res["num_valid_queries"]
    assert abs(per_query["AP"].mean() - res["mAP"]) < 1e-9 and (per_query["first_hit_rank"].dropna() >= 1).all()
    assert per_query["path"].str.startswith("query/").all()
    torch_res = json.loads(run_cli_here("evaluate", str(tmp_path / "f.h5"), "--engine", "torch", "--json").stdout)
    assert abs(torch_res["mAP"] - res["mAP"]) < 1e-6
    plain = run_cli_here("evaluate", str(tmp_path / "f.h5"), "--engine", "torch", "--similarity", "fp32", "--json")
    assert json.loads(plain.stdout)["mAP"] == torch_res["mAP"]  # the CPU's GEMM is fp32 either way
    aqe = run_cli_here("evaluate", str(tmp_path / "f.h5"), "--aqe", "--out", str(tmp_path / "aqe"), "--json")
    assert aqe.returncode == 0 and json.loads(aqe.stdout)["engine"] == "aqe+faiss", aqe.stderr
    saved = json.loads((tmp_path / "aqe" / "results.json").read_text())
    assert saved["aqe"] == {"k": 5, "alpha": 3.0} and saved["mAP"] != res["mAP"]
    bad = run_cli_here("evaluate", str(tmp_path / "f.h5"), "--similarity", "tf32")
    assert bad.returncode == 1 and "unknown similarity mode 'tf32'" in bad.stderr and "Traceback" not in bad.stderr
    # the CPU's bf16 forward: recorded as such, retrieval as good as fp32's (the default, also recorded)
    r = run_cli(
        "extract",
        "--run",
        str(tmp_path / "run"),
        "--data",
        str(h5),
        "--out",
        str(tmp_path / "b.h5"),
        "--precision",
        "bf16",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    bf16 = json.loads(
        run_cli_here("evaluate", str(tmp_path / "b.h5"), "--json", "--out", str(tmp_path / "evalb")).stdout
    )
    assert abs(bf16["mAP"] - res["mAP"]) < 0.02 and bf16["mAP"] != res["mAP"]
    with h5py.File(tmp_path / "b.h5") as f, h5py.File(tmp_path / "f.h5") as g:
        assert (f.attrs["precision"], g.attrs["precision"]) == ("bf16", "fp32")
    # the two evaluations compared query by query: their own mAPs, a small difference inside its interval, and a
    # p-value below 0.05 exactly when the interval leaves out zero. (Whether bf16's tiny shift is significant depends
    # on the CPU: p = 0.023 on a Xeon with AMX, above 0.05 on the AMD EPYC machines before.)
    r = run_cli_here("compare", str(tmp_path / "eval"), str(tmp_path / "evalb"), "--json")
    assert r.returncode == 0, r.stderr
    m_ap = json.loads(r.stdout)["metrics"][0]
    assert m_ap["A"] == pytest.approx(res["mAP"], abs=1e-12) and m_ap["B"] == pytest.approx(bf16["mAP"], abs=1e-12)
    assert m_ap["low"] <= m_ap["delta"] <= m_ap["high"] and abs(m_ap["delta"]) < 0.02
    assert (m_ap["p"] < 0.05) == (m_ap["high"] < 0 or m_ap["low"] > 0), m_ap


def test_print_model_seed_figures(tiny_data):
    def report(*extra: str) -> dict:
        args = ("--data", str(tiny_data), "--out", "unused", "--pe", "both", "--image-size", "256x192")
        r = run_cli_here("train", *args, *extra, "--print-model", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    plain = report()
    assert plain["ape"] == 148_224 and plain["grid"] == [16, 12]
    # ViT-B/16 matrix products per image, 193 tokens: patch projection, 11 × (qkv + proj + MLP, QKᵀ and AV) and the
    # last block for the CLS token: every token's qkv, then one query's attention row, proj and MLP
    n, d, layers = 193, 768, 12
    block = 2 * n * 12 * d * d + 2 * 2 * n * n * d
    last = 2 * n * 3 * d * d + 2 * (1 + 8) * d * d + 2 * 2 * n * d
    patch = 2 * 192 * (3 * 16 * 16) * d
    forward = patch + (layers - 1) * block + last
    assert plain["forward_gflop"] == pytest.approx(forward / 1e9, rel=1e-3)
    # backward = 2 × forward, less the input gradient of the patch projection (the image needs none)
    assert plain["train_gflop"] == pytest.approx((3 * forward - patch) / 1e9, rel=1e-3)
    full = patch + layers * block  # a loss on the patch tokens: the last block for every token in training
    assert report("--loss", "rp-triplet")["train_gflop"] == pytest.approx((3 * full - patch) / 1e9, rel=1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--pe", "rope"), "unknown --pe 'rope'"),
        (("--loss", "ce+focal"), "unknown loss 'focal'"),
        (("--epochs", "0"), "--epochs must be at least 1"),
        (("--batch", "30", "--k", "4"), "multiple of --k"),
        (("--image-size", "wide"), "HEIGHTxWIDTH"),
        # the stored images are the training size: refused before the split is read (was an error after it)
        (("--image-size", "32x16"), "--image-size 32x16 differs from the 64x32 images of"),
        (("--dim", "0"), "--dim must be at least 1, got 0"),  # was read as "not given": the preset's width
        (("--drop-path", "2"), "--drop-path must be in [0, 1)"),
        (("--k", "1", "--batch", "8"), "--k 1 leaves no positive pair in a batch for triplet"),
        (("--loss", "rp-triplet", "--top-n", "100"), "--top-n 100 exceeds the model's 8 patches"),
        (("--margin", "-1"), "--margin -1.0 must be positive"),
        (("--loss", "rp-triplet", "--rp-weight", "-1"), "--rp-weight -1.0: loss weights cannot be negative"),
        (("--weight-decay", "-1"), "--weight-decay cannot be negative"),
        (("--eval-every", "-1"), "--eval-every must be 0 (never)"),  # evaluated every epoch before
        (("--freeze-epochs", "5", "--epochs", "2"), "--freeze-epochs 5 must be at least 0 and below --epochs 2"),
        (("--device", "tpu"), "unknown --device 'tpu'; use auto, cpu, cuda or cuda:N"),  # was torch's RuntimeError
    ],
)
def test_train_option_errors(tiny_data, tmp_path, args, message):
    r = run_cli_here(
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "r"),
        *TINY_MODEL,
        *args,
    )
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"HF_ENDPOINT": "http://reidcli-offline.invalid"}, "(reidcli-offline.invalid:80 unreachable: "),
        ({"HF_HUB_OFFLINE": "1"}, "(LocalEntryNotFoundError)"),
    ],
)
def test_pretrained_weights_offline_fail_at_once_in_one_line(tiny_data, tmp_path, env, why):
    """Offline, timm's hub retried each file with back-off (about 50 s) and logged a warning per attempt before
    reidcli's error: a connection probe now fails at once, in one line. With HF_HUB_OFFLINE the hub's cache is
    asked without the network (no probe)."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), *TINY_MODEL, "--batch", "16"]
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "reidcli", *args, "--pretrained", "vit_tiny_patch16_224"],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot fetch pretrained 'vit_tiny_patch16_224' from timm's hub {why}" in r.stderr
    assert "--init FILE" in r.stderr and time.perf_counter() - start < 30


def test_train_out_under_a_file(tiny_data):
    r = run_cli_here("train", "--data", str(tiny_data), "--out", f"{tiny_data}/run", *TINY_MODEL)
    assert r.returncode == 1 and f"{tiny_data} is a file, not a folder" in r.stderr and r.stderr.count("\n") == 1


def test_doctor_checks_data_and_run(tiny_data, tmp_path):
    r = run_cli_here("doctor", "--data", str(tiny_data), "--json")
    assert r.returncode == 0, r.stderr
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    assert checks["torch"]["status"] == "ok" and "GPU support" in checks["faiss"]["detail"]
    built = "ok" if shutil.which("cc") or shutil.which("gcc") else "none"  # as test_scan_is_built_wherever_…
    assert checks["CPU kernels"]["status"] == built and checks["CPU GEMM"]["detail"] == "oneDNN operator"
    has_bf16 = any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16"))
    assert checks["CPU bf16"]["status"] == ("ok" if has_bf16 else "none")  # this x86 machine: avx512_bf16
    assert checks["ONNX export"]["status"] == "ok" and "onnxruntime" in checks["ONNX export"]["detail"]  # [dev] has it
    assert "12 ids" in checks["dataset"]["detail"]
    r = run_cli_here("doctor", "--run", str(tmp_path / "nope"), "--json")
    assert r.returncode == 1
    assert {c["check"]: c["status"] for c in json.loads(r.stdout)}["run"] == "FAIL"


def test_table_numbers_keep_small_values_readable():
    from reidcli.cli.console import fmt

    assert [fmt(v) for v in (0.3241, 0.0, 1.6e-05, float("nan"), 3)] == ["0.3241", "0.0000", "1.600e-05", "—", "3"]
