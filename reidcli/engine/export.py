"""ONNX export: a run's test-time embedding — pixel normalisation, flip averaging, L2 norm — as one ONNX graph whose
features equal ``reid extract``'s, for serving without reidcli (onnxruntime, TensorRT, OpenVINO)."""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reidcli import __version__
from reidcli.data.augment import normalize_batch
from reidcli.engine.checkpoint import RunFiles, load_run_model
from reidcli.errors import ConfigError, ReidError
from reidcli.fileio import atomic_path, sha256_file

__all__ = ["ExportConfig", "ExportResult", "export_onnx", "onnx_metadata", "INPUTS"]

INPUTS = ("uint8", "float")
CHECK_TOLERANCE = 1e-4  # largest |Δ| allowed between onnxruntime's and torch's L2-normalised features
_CHECK_BATCHES = (1, 5)  # two batch sizes: the graph's batch axis is symbolic


@dataclass(frozen=True)
class ExportConfig:
    run: str
    out: str
    flip: bool = True
    input: str = "uint8"  # uint8 (B, H, W, 3) RGB as 'reid prepare' stores images; float (B, 3, H, W) normalised
    opset: int | None = None  # None: the exporter's default
    check: bool = True  # run the file in onnxruntime (when installed) against the torch model

    def validate(self) -> ExportConfig:
        if self.input not in INPUTS:
            raise ConfigError(f"unknown --input {self.input!r}; choose uint8 (B,H,W,3 RGB) or float (B,3,H,W)")
        if self.opset is not None and self.opset < 18:
            raise ConfigError(f"--opset {self.opset} is too old for torch's ONNX exporter; give 18 or newer")
        if Path(self.out).suffix.lower() != ".onnx":
            raise ConfigError(f"--out {self.out} should end in .onnx")
        return self


@dataclass
class ExportResult:
    out: str
    bytes: int
    opset: int
    inputs: dict[str, list]  # name → shape ("batch" for the symbolic axis)
    feature_dim: int
    export_seconds: float
    checked: bool
    max_abs_diff: float | None = None  # onnxruntime against torch over the check images
    min_cosine: float | None = None
    note: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


class _Deploy(nn.Module):
    """What the ONNX graph computes: the images as the dataset file stores them (uint8 RGB, channels last) or
    already normalised, to :meth:`ViTReID.embed`'s L2-normalised test feature."""

    def __init__(self, model: nn.Module, flip: bool, uint8: bool):
        super().__init__()
        self.model, self.flip, self.uint8 = model, flip, uint8

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        # The same arithmetic as data.augment.normalize_batch (mean = std = 0.5), outside its in-place ops.
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0 if self.uint8 else images
        return self.model.embed(x, flip=self.flip, camids=camids)


def _require_exporter() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
            "pip install 'reidcli[export]' (or pip install onnx onnxscript onnxruntime)"
        )
    if not hasattr(torch.compiler, "is_exporting"):
        raise ConfigError(
            f"ONNX export needs torch ≥ 2.6 (torch.export's ONNX exporter); this is torch {torch.__version__}"
        )


def _example(model, uint8: bool, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded images (and cameras for a camera-embedding model) of the run's size: random pixels, which reach every
    path of the graph as real images do."""
    h, w = model.cfg.image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, h, w, 3), generator=gen, dtype=torch.uint8)
    if not uint8:
        images = normalize_batch(images)
    if not model.uses_cameras:
        return (images,)
    return images, torch.randint(0, model.cfg.sie_cameras, (batch,), generator=gen)


def export_onnx(cfg: ExportConfig) -> ExportResult:
    """Write the ONNX file atomically (with its provenance in the metadata); checked in onnxruntime before it
    appears, when onnxruntime is installed and ``cfg.check``: a file whose features differ is not written."""
    cfg.validate()
    _require_exporter()
    model, config, source = load_run_model(cfg.run, "cpu")
    uint8 = cfg.input == "uint8"
    deploy = _Deploy(model, cfg.flip, uint8).eval()
    names = ["images", "camids"] if model.uses_cameras else ["images"]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = {"images": {0: batch}} | ({"camids": {0: batch}} if model.uses_cameras else {})
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                deploy,
                _example(model, uint8, 2),
                input_names=names,
                output_names=["features"],
                dynamic_shapes=shapes,
                opset_version=cfg.opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except ReidError:
        raise
    except Exception as e:  # noqa: BLE001 — the exporter's own errors are long; one line and the way on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"torch's ONNX exporter failed on this model ({type(e).__name__}: {first[:300]}); rerun with --debug "
            "for its report, or try another --opset"
        ) from e
    seconds = time.perf_counter() - start
    h, w = model.cfg.image_size
    metadata = {
        "producer": f"reidcli {__version__}",
        "run": str(RunFiles(cfg.run).root),
        "checkpoint": str(source),
        "checkpoint_sha256": sha256_file(source),
        "model_config": json.dumps(config["model"], sort_keys=True),
        "dataset": str(config.get("dataset", "")),
        "image_size": f"{h}x{w}",
        "input": (
            f"images: uint8 (batch, {h}, {w}, 3) RGB, resized as 'reid prepare' resizes"
            if uint8
            else f"images: float32 (batch, 3, {h}, {w}) RGB, (pixel / 255 - 0.5) / 0.5"
        )
        + ("; camids: int64 (batch,) 0-based camera ids" if model.uses_cameras else ""),
        "output": f"features: float32 (batch, {model.cfg.feature_dim}) L2-normalised; cosine = dot product",
        "flip": str(int(cfg.flip)),
    }
    program.model.metadata_props.update(metadata)
    program.model.doc_string = "reidcli person re-identification embedding; see metadata_props"
    inputs = {v.name: [d if isinstance(d, int) else "batch" for d in v.shape] for v in program.model.graph.inputs}
    opset = int(program.model.opset_imports.get("", 0))
    out = Path(cfg.out)
    result = ExportResult(str(out), 0, opset, inputs, model.cfg.feature_dim, seconds, False, metadata=metadata)
    with atomic_path(out, suffix=".onnx") as tmp:
        program.save(tmp, external_data=False)
        if cfg.check:
            _check(tmp, model, deploy, uint8, names, result)
        else:
            result.note = "not checked (--no-check)"
        result.bytes = tmp.stat().st_size
    return result


def _check(path: Path, model, deploy: _Deploy, uint8: bool, names: list[str], result: ExportResult) -> None:
    """onnxruntime's features against the torch model's on seeded images at two batch sizes."""
    try:
        import onnxruntime as ort
    except ImportError:
        result.note = "not checked: onnxruntime is not installed (pip install onnxruntime)"
        return
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    diff, cosine = 0.0, 1.0
    for seed, b in enumerate(_CHECK_BATCHES, start=1):
        args = _example(model, uint8, b, seed)
        got = session.run(["features"], {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
        with torch.no_grad():
            want = deploy(*args).numpy()
        if got.shape != want.shape:
            raise ConfigError(f"the exported graph gives features {got.shape} for {want.shape}; not written")
        diff = max(diff, float(np.abs(got - want).max()))
        cosine = min(cosine, float((got * want).sum(1).min()))
    result.checked, result.max_abs_diff, result.min_cosine = True, diff, cosine
    if not diff <= CHECK_TOLERANCE:
        raise ConfigError(
            f"onnxruntime's features differ from the model's by up to {diff:.2e} (> {CHECK_TOLERANCE:g}); the "
            "file was not written: try another --opset, or --no-check to keep it anyway"
        )


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The provenance an exported file records (``metadata_props``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
