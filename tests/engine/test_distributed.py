import json
import os
import subprocess
import sys

from reidcli.engine.checkpoint import RunFiles, load_checkpoint
from tests.conftest import TINY_MODEL


def test_two_process_gloo_run_trains_and_writes_one_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "reidcli",
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--pe",
        "both",
        "--loss",
        "ce+triplet+center+rp-triplet",  # the centres' gradient is averaged over the processes
        *TINY_MODEL,
        "--epochs",
        "2",
        "--freeze-epochs",  # epoch 1 trains the head alone; at the thaw each process wraps the model in DDP again
        "1",
        "--batch",
        "16",
        "--k",
        "4",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = RunFiles(run)
    assert json.loads(files.config.read_text())["world_size"] == 2
    assert load_checkpoint(files.checkpoint)["epoch"] == 2
    assert [p.name for p in run.iterdir() if p.suffix == ".pt"] == ["checkpoint.pt"]
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert [r["backbone_frozen"] for r in rows] == [True, False]
    assert files.weights.is_file()
