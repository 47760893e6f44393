"""``reid import``: a ReID ViT trained elsewhere (TransReID, timm format) as a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table
from reidcli.cli.options import JpmShiftOpt, JpmShuffleOpt, JsonOpt, NeckFeatOpt, SieWeightOpt, parse_size


def import_(
    weights: Annotated[Path, typer.Argument(help="State dict (.pth, .safetensors): TransReID's, or a timm ViT's.")],
    out: Annotated[Path, typer.Option(help="Run folder to create (new or empty).")],
    image_size: Annotated[str, typer.Option(help="HEIGHTxWIDTH the weights were trained at.")] = "256x128",
    stride: Annotated[
        int | None, typer.Option(help="Patch stride (default: the one the weights' APE length gives, e.g. 12).")
    ] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads (default: width / 64).")] = None,
    pe: Annotated[str | None, typer.Option(help="Position encoding (default: what the weights hold).")] = None,
    neck_feat: NeckFeatOpt = "before",
    sie_weight: SieWeightOpt = 3.0,
    jpm_shift: JpmShiftOpt = 4,
    jpm_shuffle: JpmShuffleOpt = 2,
    json_out: JsonOpt = False,
) -> None:
    """Make a run folder (config.json, model.safetensors) from a ReID ViT trained by another tool, so that extract,
    evaluate, search, export and plot work on it: e.g. a TransReID Market-1501 model evaluated here.

    The model is read from the weights: width, depth, patch size, MLP ratio, APE or relative tables, the stride
    from the APE's length, TransReID's JPM (b1/b2 branches) and SIE cameras, the BNNeck and classifier. Every
    backbone tensor must fit; a missing BNNeck is initialised (features before it are unaffected).

    Examples:

      reid import transformer_120.pth --out runs/transreid_market     # then: reid extract --run runs/transreid_market …

      reid import vit_transreid_market.pth --out runs/tr_jpm --neck-feat before --image-size 256x128

      reid extract --run runs/transreid_market --data data/market1501.h5 --out feats/tr.h5 --no-flip  # TransReID's test
    """
    from reidcli.engine.importer import ImportOptions, import_run

    options = ImportOptions(
        image_size=parse_size(image_size),
        stride=stride,
        heads=heads,
        pe=pe,
        neck_feat=neck_feat,
        sie_weight=sie_weight,
        jpm_shift=jpm_shift,
        jpm_shuffle=jpm_shuffle,
    )
    with err.status(f"importing {weights}"):
        result = import_run(weights, out, options)
    c = result.config
    summary = {
        "out": str(result.out),
        "model": f"ViT {c.dim} wide, {c.depth} blocks, {c.heads} heads, patch {c.patch_size} stride {c.stride}",
        "input": f"{c.image_size[0]}x{c.image_size[1]} ({c.grid[0]}x{c.grid[1]} patches)",
        "pe": c.pe,
        "jpm": f"{c.jpm_groups} groups" if c.jpm else "no",
        "sie cameras": c.sie_cameras,
        "classes": c.num_classes,
        "test feature": f"{c.feature_dim} wide, {c.neck_feat} the BNNeck",
        "initialised": len(result.initialised),
        "left out": len(result.dropped),
    }
    if json_out:
        print_json({**summary, "initialised": result.initialised, "left out": result.dropped})
        return
    print_table(f"imported {weights}", ["", ""], list(summary.items()))
    for what, keys in (
        ("not in the weights, initialised", result.initialised),
        ("in the weights, not used", result.dropped),
    ):
        if keys:
            err.print(f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}")


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
