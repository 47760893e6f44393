"""``reid export``: a trained run's embedding as one ONNX file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, fmt, print_json, print_table
from reidcli.cli.options import JsonOpt


def export(
    run: Annotated[Path, typer.Option(help="Run folder from 'reid train'.")],
    out: Annotated[Path, typer.Option(help="ONNX file to write (.onnx).")],
    input_: Annotated[
        str,
        typer.Option(
            "--input",
            help="uint8: (B,H,W,3) RGB pixels as 'reid prepare' stores them, normalised in the graph; "
            "float: (B,3,H,W) already normalised (mean = std = 0.5).",
        ),
    ] = "uint8",
    flip: Annotated[bool, typer.Option(help="Average with the horizontally flipped image, as 'reid extract'.")] = True,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    check: Annotated[
        bool, typer.Option(help="Run the file in onnxruntime (when installed) against the model before keeping it.")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Export the run's test-time embedding to ONNX: pixels in, L2-normalised features out (flip-averaged), with
    a symbolic batch axis and the run's provenance in the file's metadata. Camera-embedding (--sie) runs take a
    second input, camids.

    The features equal 'reid extract''s for the same images (checked in onnxruntime before the file is written).

    Examples:

      reid export --run runs/rpe --out deploy/rpe.onnx

      reid export --run runs/rpe --out deploy/rpe_float.onnx --input float --no-flip
    """
    from reidcli.engine.export import ExportConfig, export_onnx

    cfg = ExportConfig(run=str(run), out=str(out), flip=flip, input=input_, opset=opset, check=check).validate()
    with err.status("exporting to ONNX"):
        result = export_onnx(cfg)
    if json_out:
        print_json(asdict(result))
        return
    shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in result.inputs.items())
    rows = [
        ("inputs", shapes.replace("'", "")),
        ("features", f"(batch, {result.feature_dim})"),
        ("opset", result.opset),
        ("size", f"{result.bytes / 2**20:.1f} MiB"),
        ("export", f"{result.export_seconds:.1f} s"),
    ]
    if result.checked:
        rows.append(("onnxruntime max |Δ|", f"{result.max_abs_diff:.1e} (min cosine {fmt(result.min_cosine, 6)})"))
    else:
        rows.append(("check", result.note))
    print_table(f"ONNX → {out}", ["field", "value"], rows)


def register(app: typer.Typer) -> None:
    app.command()(export)
