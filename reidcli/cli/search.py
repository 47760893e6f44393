"""``reid search``: the gallery images nearest new query images, through a saved FAISS index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table
from reidcli.cli.options import DeviceOpt, JsonOpt, check_out_folder, refuse_unused


def search(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Query images (JPEG, PNG, BMP), or folders of them.")],
    index: Annotated[Path, typer.Option(help="FAISS index from 'reid index'.")],
    features: Annotated[
        Path | None, typer.Option(help="Features file the index was built from (default: the one it records).")
    ] = None,
    run: Annotated[
        Path | None, typer.Option(help="Run whose weights extracted the gallery (default: the one recorded).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Gallery images per query.")] = 10,
    camid: Annotated[
        int | None, typer.Option(help="Camera of the query images (0-based), for a model trained with --sie.")
    ] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str, typer.Option(help="Query forward: auto (GPU fp16, CPU fp32), fp16, bf16 or fp32.")
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Folder for search.csv and the picture search.png.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset HDF5 with the gallery images for the picture (default: recorded).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Find the gallery images nearest each query image: embed the queries with the gallery's own model (checked by
    its SHA-256, with the same flip averaging) and search the saved FAISS index.

    Examples:

      reid search person.jpg --index feats/both.faiss

      reid search crops/ --index feats/both.faiss --top-k 20 --out results/search    # a folder of queries

      reid search q.png --index big.faiss --features feats/big.h5 --run runs/both --json
    """
    from reidcli.retrieval.search import search_images

    refuse_unused(ctx, ("data",), out is not None, "--out", "add --out DIR")
    if out is not None:
        check_out_folder(out)
    images_from = (data or True) if out is not None else None
    result = search_images(index, images, features, run, top_k, device, precision, images_from=images_from, camid=camid)
    if not result.checked:
        err.print(f"notice: {result.features} records no weights' SHA-256: the queries' model could not be checked")
    found = result.to_dict()
    pictures = _write(out, result, found["queries"]) if out is not None else []
    if json_out:
        print_json({**found, "pictures": [str(p) for p in pictures]})
        return
    rows = [
        (
            e["query"] if hit["rank"] == 1 else "",
            hit["rank"],
            f"{hit['score']:.4f}",
            hit["pid"],
            hit["camid"],
            hit["path"],
        )
        for e in found["queries"]
        for hit in e["results"]
    ]
    title = f"top-{top_k} in {result.features} ({'exact' if result.exact else 'approximate'} index)"
    print_table(title, ["query", "rank", "score", "pid", "camid", "gallery image"], rows)
    if out is not None:
        err.print(f"written: {out / 'search.csv'}, {', '.join(str(p) for p in pictures)}")


def _write(out: Path, result, entries: list[dict]) -> list[Path]:
    """search.csv (one row per query and rank) and search.png (each query beside its ranked gallery images; more
    than 16 queries: search_01.png, search_02.png, …). Returns the pictures."""
    import numpy as np
    import pandas as pd

    from reidcli.data.store import read_images
    from reidcli.fileio import atomic_path
    from reidcli.report.plots import plot_ranked_lists
    from reidcli.report.ranked import pages

    table = pd.DataFrame(
        [{"query": e["query"], **hit} for e in entries for hit in e["results"]],
        columns=["query", "rank", "score", "row", "path", "pid", "camid"],
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "search.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    found = (result.rows >= 0).all(0)  # ranks every query filled (IVF-PQ may find fewer than k)
    rows = result.rows[:, found]
    pids, scores = result.gallery.pids[rows], result.scores[:, found]
    labels = np.array([[f"{c + 1}: id {p}\n{s:.3f}" for c, (p, s) in enumerate(zip(*row, strict=True))] for row in
                       zip(pids, scores, strict=True)])  # fmt: skip
    names = [q.name for q in result.queries]
    written = []
    for path, part, page in pages(out / "search.png", len(rows)):
        plot_ranked_lists(
            result.images[part],
            read_images(result.dataset, result.split, rows[part]),
            np.full(rows[part].shape, 2),  # the queries' identities are unknown: neutral borders
            path,
            title=f"top-{rows.shape[1]} gallery images per query (cosine similarity){page}",
            labels=labels[part],
            query_labels=names[part],
        )
        written.append(path)
    return written


def register(app: typer.Typer) -> None:
    app.command()(search)
