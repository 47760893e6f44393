"""``reid doctor``: versions, devices, FAISS GPU support, and whether a dataset and run folder fit together."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import print_json, print_table
from reidcli.cli.options import JsonOpt


def doctor(
    data: Annotated[Path | None, typer.Option(help="A dataset HDF5 to check.")] = None,
    run: Annotated[Path | None, typer.Option(help="A run folder to check (against --data when given).")] = None,
    features: Annotated[
        Path | None,
        typer.Option(help="A features HDF5 to check: against the weights it came from, --run and --data."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Report the environment, and check that a dataset file, a run folder and a features file are readable and
    consistent (a features file extracted from weights that have changed since is stale).

    Examples:

      reid doctor

      reid doctor --data data/market1501.h5 --run runs/both

      reid doctor --features feats/both.h5 --run runs/both --data data/market1501.h5
    """
    from reidcli.errors import ReidError

    checks: list[tuple[str, str, str]] = _environment()
    for label, arg, check in (
        ("dataset", data, lambda: _check_data(data)),
        ("run", run, lambda: _check_run(run, data)),
        ("features", features, lambda: _check_features(features, run, data)),
    ):
        if arg is not None:
            try:
                checks += check()
            except ReidError as e:
                checks.append((label, "FAIL", str(e)))
    if json_out:
        print_json([{"check": c, "status": s, "detail": d} for c, s, d in checks])
    else:
        print_table("reid doctor", ["check", "status", "detail"], checks)
    if any(s == "FAIL" for _, s, _ in checks):
        raise typer.Exit(1)


def _environment() -> list[tuple[str, str, str]]:
    import h5py
    import timm
    import torch

    from reidcli import __version__

    rows = [
        ("reidcli", "ok", __version__),
        ("python", "ok", platform.python_version()),
        ("torch", "ok", torch.__version__),
        ("timm", "ok", timm.__version__),
        ("h5py", "ok", h5py.__version__),
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("CUDA", "ok", f"{torch.cuda.device_count()} GPU(s): {names}"))
    else:
        rows.append(("CUDA", "none", "no GPU visible: training and evaluation run on the CPU"))
    from reidcli.onednn import cpu_gemm_way
    from reidcli.retrieval import native

    if native.available():
        rows.append(("CPU kernels", "ok", "compiled (exact rank counting scan, re-ranking's neighbour fold and join)"))
    else:
        rows.append(("CPU kernels", "none", "not built: torch fallbacks (same numbers, slower); reinstall with cc"))
    gemm = {"onednn": "oneDNN operator", "mkldnn": "oneDNN (mkldnn layout)", "mm": "torch.mm (no oneDNN)"}
    rows.append(("CPU GEMM", "ok", gemm[cpu_gemm_way()]))
    rows.append(_cpu_bf16())
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rows.append(("faiss", "ok", f"{faiss.__version__}, GPU support: {'yes' if gpus else 'no'}"))
    except ImportError:
        rows.append(("faiss", "FAIL", "not installed: run 'make install'"))
    rows.append(_onnx())
    return rows


def _onnx() -> tuple[str, str, str]:
    """Whether ``reid export`` can write (onnx, onnxscript) and check (onnxruntime) an ONNX file: optional."""
    from importlib.metadata import PackageNotFoundError, version

    found, missing = [], []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    if not missing:
        return ("ONNX export", "ok", ", ".join(found))
    return ("ONNX export", "none", f"{', '.join(missing)} not installed: pip install 'reidcli[export]' for reid export")


def _cpu_bf16() -> tuple[str, str, str]:
    """Whether the CPU multiplies bf16 in hardware (then ``--precision bf16`` pays off), from its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ("CPU bf16", "unknown", "no /proc/cpuinfo: compare --precision bf16 with fp32 on a few batches")
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split()}
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if found:
        return ("CPU bf16", "ok", f"{', '.join(found)}: --precision bf16 runs ViT-S/B ~1.5x faster than fp32")
    return ("CPU bf16", "none", "no bf16 instructions (software conversion): keep the CPU's default fp32")


def _check_data(path: Path) -> list[tuple[str, str, str]]:
    from reidcli.data.store import dataset_summary, read_dataset

    attrs, splits = read_dataset(path, images=False)
    counts = "; ".join(f"{r['split']} {r['images']} images / {r['ids']} ids" for r in dataset_summary(splits))
    size = "x".join(str(v) for v in attrs["image_size"])
    return [("dataset", "ok", f"{path}: {attrs.get('name')} at {size}; {counts}")]


def _check_run(run: Path, data: Path | None) -> list[tuple[str, str, str]]:
    from reidcli.data.store import camera_count, read_dataset
    from reidcli.engine.checkpoint import RunFiles, load_run_model

    model, config, source = load_run_model(run, "cpu")
    files = RunFiles(run)
    state = "finished" if files.weights.is_file() else "in progress (checkpoint only)"
    rows = [("run", "ok", f"{run}: {config['model']['pe']} ViT, {state}, weights from {source.name}")]
    if data is not None:
        attrs, splits = read_dataset(data, images=False)
        size = tuple(attrs["image_size"])
        ids = len(set(splits["train"].pids.tolist()))
        ok = size == tuple(model.cfg.image_size) and ids == model.cfg.num_classes
        detail = (
            f"dataset {size[0]}x{size[1]} with {ids} train ids; model {model.cfg.image_size[0]}x"
            f"{model.cfg.image_size[1]} with {model.cfg.num_classes} classes"
        )
        if model.uses_cameras:  # every camera of the dataset needs its embedding
            cameras = camera_count(splits)
            ok = ok and cameras <= model.cfg.sie_cameras
            detail += f"; dataset cameras {cameras}, model's camera embeddings (SIE) {model.cfg.sie_cameras}"
        rows.append(("run ↔ dataset", "ok" if ok else "FAIL", detail))
    return rows


def _check_features(path: Path, run: Path | None, data: Path | None) -> list[tuple[str, str, str]]:
    """The file itself; whether the weights it was extracted from are still those on disk (by SHA-256); its width
    against --run's model; its rows, identities and cameras against --data's query and gallery."""
    import h5py
    import numpy as np

    from reidcli.fileio import sha256_file
    from reidcli.retrieval.features import read_features

    read_features(path, ())  # the file and its format, or one line saying what is wrong
    with h5py.File(path, "r") as h5:
        present = tuple(s for s in ("train", "query", "gallery") if s in h5)
    attrs, splits = read_features(path, present or ("query", "gallery"))
    dim = next(iter(splits.values())).feats.shape[1]
    counts = ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    rows = [("features", "ok", f"{path}: {counts} rows of {dim} values ({next(iter(splits.values())).feats.dtype})")]
    digest = attrs.get("checkpoint_sha256")
    if run is not None:
        from reidcli.engine.checkpoint import RunFiles, read_run_config

        width = int(read_run_config(run)["model"]["dim"])
        files = RunFiles(run)
        final, ckpt = (sha256_file(f) if f.is_file() else None for f in (files.weights, files.checkpoint))
        if width != dim:
            status, detail = "FAIL", f"features {dim} wide, the run's model {width} wide: another run's features"
        elif digest is not None and digest == final:
            status, detail = "ok", f"extracted from {files.weights} as it is now"
        elif digest is not None and digest == ckpt:
            status = "FAIL" if final else "ok"
            detail = (
                "extracted from checkpoint.pt during training, and the run has finished since: extract again from "
                "its final weights"
                if final
                else f"extracted from {files.checkpoint} as it is now (the run is still training)"
            )
        else:
            status = "FAIL"
            detail = f"not extracted from {run}'s weights as they are now (trained further or again since, or another "
            detail += "run's features): extract them again"
        rows.append(("features ↔ run", status, detail))
    elif attrs.get("checkpoint") and digest:
        weights = Path(attrs["checkpoint"])
        if not weights.is_file():
            rows.append(("features ↔ weights", "unknown", f"{weights} is not found from here; pass --run RUN"))
        elif sha256_file(weights) != digest:
            rows.append(("features ↔ weights", "FAIL", f"{weights} has changed since: the features are stale"))
        else:
            rows.append(("features ↔ weights", "ok", f"extracted from {weights} as it is now"))
    if data is not None:
        from reidcli.data.store import read_dataset

        _, parts = read_dataset(data, tuple(splits), images=False)
        differ = [
            name
            for name, s in splits.items()
            if len(s) != len(parts[name])
            or not np.array_equal(s.pids, parts[name].pids)
            or not np.array_equal(s.camids, parts[name].camids)
        ]
        detail = (
            f"{', '.join(differ)} differ from {data}'s (rows, identities or cameras): features of another dataset?"
            if differ
            else f"rows, identities and cameras equal {data}'s"
        )
        rows.append(("features ↔ dataset", "FAIL" if differ else "ok", detail))
    return rows


def register(app: typer.Typer) -> None:
    app.command()(doctor)
