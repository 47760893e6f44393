import json
import os
import subprocess
import sys
from pathlib import Path

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


def _replicas_worker(rank: int, world: int, port: int, out: str) -> None:
    """One process of a gloo group: equal tensors, then one that differs on rank 1 only."""
    import torch
    import torch.distributed as dist

    from reidcli.engine.distributed import DistInfo, first_differing_replica

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank)
    torch.manual_seed(0)
    named = {"a": torch.randn(4, 3), "b": torch.randn(5), "c": torch.zeros(2)}
    same = first_differing_replica(named, info)
    if rank == 1:
        named["b"][2] += 1e-5  # one element of one tensor, on one process
    drifted = first_differing_replica(named, info)
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps([same, drifted]))


def test_every_process_learns_which_tensor_drifted_from_rank_0(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_replicas_worker, args=(2, 29533, str(tmp_path)), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert answers == [[None, "b"], [None, "b"]]  # rank 0 too: every process stops, none waits in a collective


def test_replica_summaries_tell_a_drift_from_a_summation_order():
    import torch

    from reidcli.engine.distributed import replica_summary, summaries_differ

    torch.manual_seed(0)
    t = [torch.randn(1000), torch.zeros(3), torch.randn(7, 7)]
    ref = replica_summary(t)
    assert not summaries_differ(replica_summary([x.clone() for x in t]), ref).any()
    reordered = replica_summary([t[0].flip(0), t[1], t[2].T.contiguous()])  # another order of the same values
    assert not summaries_differ(reordered, ref).any()
    drift = [t[0].clone(), t[1].clone(), t[2]]
    drift[0][10] += 1e-6
    drift[1][0] = 1e-30  # a tensor of zeros that moved at all
    assert summaries_differ(replica_summary(drift), ref).tolist() == [True, True, False]
