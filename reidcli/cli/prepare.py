"""``reid prepare``: a dataset folder (or zip, or the synthetic generator) → dataset HDF5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table, progress
from reidcli.cli.options import JsonOpt, parse_size, refuse_unused
from reidcli.errors import DataError


def prepare(
    ctx: typer.Context,
    dataset: Annotated[
        str,
        typer.Argument(
            help="market1501, dukemtmcreid, occludedduke, msmt17, cuhk03np, veri776 (vehicles), synthetic or custom."
        ),
    ],
    root: Annotated[Path, typer.Option(help="Extracted dataset folder or its zip; for synthetic, where to write it.")],
    out: Annotated[Path | None, typer.Option(help="Output HDF5 (default: data/<dataset>.h5).")] = None,
    image_size: Annotated[str, typer.Option(help="Stored image size HEIGHTxWIDTH.")] = "256x128",
    extra_gallery: Annotated[
        Path | None,
        typer.Option(
            help="More gallery images, a folder or zip in Market-1501 naming (junk -1 left out), e.g. Market-1501's "
            "500k distractors (torchreid's images/ folder)."
        ),
    ] = None,
    resize: Annotated[
        str,
        typer.Option(help="Filter to the stored size: bicubic (fast-reid) or bilinear (TransReID's and torchreid's)."),
    ] = "bicubic",
    skip_bad: Annotated[bool, typer.Option(help="Leave out unreadable images (counted) instead of stopping.")] = False,
    cuhk03_subset: Annotated[str, typer.Option(help="cuhk03np: detected or labeled.")] = "detected",
    seed: Annotated[int, typer.Option(help="synthetic: random seed (same seed, same bytes).")] = 0,
    ids: Annotated[int, typer.Option(help="synthetic: identities in train and in test, each.")] = 100,
    cameras: Annotated[int, typer.Option(help="synthetic: number of cameras (2-9).")] = 6,
    images_per_camera: Annotated[int, typer.Option(help="synthetic: images per identity and camera.")] = 3,
    difficulty: Annotated[float, typer.Option(help="synthetic: 0 (easy) … 1 (hard).")] = 0.3,
    distractors: Annotated[int, typer.Option(help="synthetic: distractor images (pid 0000) in the gallery.")] = 50,
    junk: Annotated[int, typer.Option(help="synthetic: junk images (pid -1) in the gallery.")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Parse a dataset in its public layout, validate it, decode and resize every image once into one HDF5 file.

    Examples:

      reid prepare market1501 --root ~/data/Market-1501-v15.09.15 --out data/market.h5

      reid prepare msmt17 --root ~/data/MSMT17_V1.zip

      reid prepare market1501 --root ~/data/Market-1501-v15.09.15 --extra-gallery ~/data/distractors_500k.zip

      reid prepare veri776 --root ~/data/VeRi --image-size 256x256     # TransReID's vehicle benchmark

      reid prepare synthetic --root demo/synthetic --seed 0 --ids 60 --image-size 128x64
    """
    from reidcli.data.prepare import PrepareConfig, prepare_dataset

    synthetic = ("seed", "ids", "cameras", "images_per_camera", "difficulty", "distractors", "junk")
    refuse_unused(ctx, synthetic, dataset == "synthetic", "the synthetic dataset", "prepare synthetic")
    refuse_unused(ctx, ("cuhk03_subset",), dataset == "cuhk03np", "the cuhk03np dataset", "prepare cuhk03np")
    size = parse_size(image_size)
    out = out or Path("data") / f"{dataset}.h5"
    if dataset == "synthetic":
        _generate(root, seed, ids, cameras, images_per_camera, difficulty, distractors, junk)
    cfg = PrepareConfig(
        dataset=dataset,
        root=root,
        out=out,
        image_size=size,
        skip_bad=skip_bad,
        cuhk03_subset=cuhk03_subset,
        extra_gallery=extra_gallery,
        resize=resize,
    )
    with progress(f"prepare {dataset}") as update:
        result = prepare_dataset(cfg, update)
    if json_out:
        print_json({"out": str(result.out), "splits": result.rows, "skipped": result.skipped})
        return
    rows = [(r["split"], r["images"], r["ids"], r["cameras"]) for r in result.rows]
    print_table(f"{dataset} → {result.out}", ["split", "images", "ids", "cameras"], rows)
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]}")


def _generate(root: Path, seed, ids, cameras, images_per_camera, difficulty, distractors, junk) -> None:
    """Draw the synthetic dataset into ``root``, or reuse it there if the same options drew it (same bytes)."""
    from reidcli.data.synthetic import MARKER, SyntheticConfig, generate_synthetic

    cfg = SyntheticConfig(
        num_train_ids=ids,
        num_test_ids=ids,
        num_cameras=cameras,
        images_per_camera=images_per_camera,
        difficulty=difficulty,
        num_distractors=distractors,
        num_junk=junk,
        seed=seed,
    )
    cfg.validate()
    if root.exists() and any(root.iterdir()):
        if _drawn_with(root / MARKER) == cfg.to_dict():
            err.print(f"reusing the synthetic data in {root} (drawn with the same options)")
            return
        raise DataError(
            f"{root} is not empty and holds no synthetic data drawn with these options; pass an empty or new --root"
        )
    partial = root.with_name(f".{root.name}.partial")  # renamed into place only when complete
    shutil.rmtree(partial, ignore_errors=True)
    with err.status("drawing synthetic pedestrians"):
        generate_synthetic(partial, cfg)
    if root.exists():
        root.rmdir()
    partial.rename(root)


def _drawn_with(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def register(app: typer.Typer) -> None:
    app.command()(prepare)
