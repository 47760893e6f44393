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
    onnx: Annotated[
        Path | None,
        typer.Option(help="An ONNX file from 'reid export' to check: valid, and against the weights it came from."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Report the environment, and check that a dataset file, a run folder, a features file and an exported ONNX
    file are readable and consistent (features or an ONNX file made from weights that have changed since are stale).

    Examples:

      reid doctor

      reid doctor --data data/market1501.h5 --run runs/both

      reid doctor --features feats/both.h5 --run runs/both --data data/market1501.h5

      reid doctor --onnx deploy/both.onnx --run runs/both     # exported from the run's weights as they are now?
    """
    from reidcli.errors import ReidError

    checks: list[tuple[str, str, str]] = _environment()
    for label, arg, check in (
        ("dataset", data, lambda: _check_data(data)),
        ("run", run, lambda: _check_run(run, data)),
        ("features", features, lambda: _check_features(features, run, data)),
        ("ONNX", onnx, lambda: _check_onnx(onnx, run)),
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
    if config.get("imported_from"):
        state = f"imported from {config['imported_from'].get('path', '?')} by 'reid import'"
    rows = [("run", "ok", f"{run}: {config['model']['pe']} ViT, {state}, weights from {source.name}")]
    if data is not None:
        attrs, splits = read_dataset(data, images=False)
        size = tuple(attrs["image_size"])
        from reidcli.engine.train import joined_train_split

        extra = tuple(p for p in config.get("extra_data") or () if Path(p).is_file())
        # the run's classes: the train ids of --data and of each --extra-data dataset (with --combine-all, of their
        # query and gallery too)
        combine = bool(config.get("combine_all"))
        ids = len(set(joined_train_split(str(data), extra, size, combine, images=False)[1].pids.tolist()))
        ok = size == tuple(model.cfg.image_size)  # what extract and evaluate need; the classes: what training does
        joined = (f" (+ {len(extra)} --extra-data)" if extra else "") + (" with --combine-all" if combine else "")
        detail = (
            f"dataset{joined} {size[0]}x{size[1]} with {ids} train ids; model {model.cfg.image_size[0]}x"
            f"{model.cfg.image_size[1]} with {model.cfg.num_classes} classes"
        )
        if model.uses_cameras:  # every camera of the dataset needs its embedding
            cameras = camera_count(splits)
            ok = ok and cameras <= model.cfg.sie_cameras
            detail += f"; dataset cameras {cameras}, model's camera embeddings (SIE) {model.cfg.sie_cameras}"
        status = "FAIL" if not ok else "ok" if ids == model.cfg.num_classes else "note"
        if status == "note":  # another dataset's model (or an imported one): evaluated here, not trained or resumed
            detail += "; it can be extracted and evaluated on this dataset, not trained on with --resume"
        rows.append(("run ↔ dataset", status, detail))
    return rows


def _check_features(path: Path, run: Path | None, data: Path | None) -> list[tuple[str, str, str]]:
    """The file itself; whether the weights it was extracted from are still those on disk (by SHA-256); its width
    against --run's model; its rows, identities and cameras against --data's query and gallery."""
    import h5py
    import numpy as np

    from reidcli.retrieval.features import read_features, renormalised_notice

    read_features(path, ())  # the file and its format, or one line saying what is wrong
    with h5py.File(path, "r") as h5:
        present = tuple(s for s in ("train", "query", "gallery") if s in h5)
    attrs, splits = read_features(path, present or ("query", "gallery"))
    dim = next(iter(splits.values())).feats.shape[1]
    counts = ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    rows = [("features", "ok", f"{path}: {counts} rows of {dim} values ({next(iter(splits.values())).feats.dtype})")]
    if notice := renormalised_notice(None, splits):  # handled on every read: a note, not a failure
        rows.append(("features rows", "note", notice))
    if run is not None:
        from reidcli.engine.checkpoint import read_run_config
        from reidcli.model.vit import ModelConfig

        width = ModelConfig.from_dict(read_run_config(run)["model"]).feature_dim
        if width != dim:
            rows.append(("features ↔ run", "FAIL", f"features {dim} wide, the run's model {width}: another run's"))
        else:
            rows += _weights_rows("features", attrs.get("checkpoint_sha256"), attrs.get("checkpoint"), run)
    else:
        rows += _weights_rows("features", attrs.get("checkpoint_sha256"), attrs.get("checkpoint"), None)
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


_MADE = {
    "features": ("extracted", "extract them again", "the features are stale"),
    "ONNX": ("exported", "export it again", "the ONNX file is stale"),
}


def _weights_rows(kind: str, digest: str | None, checkpoint: str | None, run: Path | None) -> list[tuple]:
    """Whether the weights a features or ONNX file records (by SHA-256) are --run's as they are now, or, without
    --run, the recorded weights file as it is now."""
    from reidcli.fileio import sha256_file

    made, again, stale = _MADE[kind]
    if run is not None:
        from reidcli.engine.checkpoint import RunFiles

        files = RunFiles(run)
        final, ckpt = (sha256_file(f) if f.is_file() else None for f in (files.weights, files.checkpoint))
        if digest is not None and digest == final:
            status, detail = "ok", f"{made} from {files.weights} as it is now"
        elif digest is not None and digest == ckpt:
            status = "FAIL" if final else "ok"
            detail = (
                f"{made} from checkpoint.pt during training, and the run has finished since: {again} from its final "
                "weights"
                if final
                else f"{made} from {files.checkpoint} as it is now (the run is still training)"
            )
        else:
            status = "FAIL"
            detail = f"not {made} from {run}'s weights as they are now (trained further or again since, or another "
            detail += f"run's): {again}"
        return [(f"{kind} ↔ run", status, detail)]
    if not (checkpoint and digest):
        return []
    weights = Path(checkpoint)
    if not weights.is_file():
        return [(f"{kind} ↔ weights", "unknown", f"{weights} is not found from here; pass --run RUN")]
    if sha256_file(weights) != digest:
        return [(f"{kind} ↔ weights", "FAIL", f"{weights} has changed since: {stale}; {again}")]
    return [(f"{kind} ↔ weights", "ok", f"{made} from {weights} as it is now")]


def _check_onnx(path: Path, run: Path | None) -> list[tuple[str, str, str]]:
    """An exported file: valid ONNX, what it takes and gives, and whether its weights are still the run's."""
    from reidcli.errors import ConfigError, FormatError

    try:
        import onnx
    except ImportError as e:
        raise ConfigError("checking an ONNX file needs the onnx package: pip install 'reidcli[export]'") from e
    if not path.is_file():
        raise FormatError(f"{path} not found; write one with 'reid export'")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 — protobuf and checker errors alike: the file is not a valid model
        raise FormatError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e)[:200]})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "checkpoint_sha256" not in meta:
        return [("ONNX", "ok", f"{path}: valid ONNX, but not written by 'reid export' (no provenance to check)")]

    def shape(value) -> str:
        dims = value.type.tensor_type.shape.dim
        return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + ")"

    inputs = ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.input)
    outputs = ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.output)
    flip = "flip-averaged" if meta.get("flip") == "1" else "no flip"
    rows = [("ONNX", "ok", f"{path}: {inputs} → {outputs}, {flip}, from {meta.get('producer', '?')}")]
    return rows + _weights_rows("ONNX", meta["checkpoint_sha256"], meta.get("checkpoint"), run)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
