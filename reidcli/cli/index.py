"""``reid index``: a FAISS index over one split of a features file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table
from reidcli.cli.options import JsonOpt, refuse_unused


def index(
    ctx: typer.Context,
    features: Annotated[Path, typer.Argument(help="Features HDF5 from 'reid extract'.")],
    out: Annotated[Path, typer.Option(help="Index file (.faiss); provenance goes to OUT.json.")],
    split: Annotated[str, typer.Option(help="Split to index.")] = "gallery",
    kind: Annotated[str, typer.Option(help="flat (exact) or ivfpq (approximate).")] = "flat",
    nlist: Annotated[int, typer.Option(help="ivfpq: inverted lists (0: about 4·√N).")] = 0,
    m: Annotated[int, typer.Option("--m", help="ivfpq: PQ sub-quantisers (divides the dimension).")] = 32,
    nprobe: Annotated[int, typer.Option(help="ivfpq: lists visited per query.")] = 16,
    json_out: JsonOpt = False,
) -> None:
    """Build a FAISS index (flat inner product = exact cosine; or IVF-PQ) and save it with its row mapping.

    Examples:

      reid index feats/rpe.h5 --out feats/rpe.faiss

      reid index feats/big.h5 --out feats/big.faiss --kind ivfpq --nlist 4096 --m 64 --nprobe 32
    """
    from reidcli.retrieval.features import read_features, renormalised_notice
    from reidcli.retrieval.index import IndexConfig, build_index, faiss_gpu_count, index_meta, load_index, save_index

    refuse_unused(ctx, ("nlist", "m", "nprobe"), kind == "ivfpq", "--kind ivfpq", "add --kind ivfpq")
    _, splits = read_features(features, (split,))
    if notice := renormalised_notice(features, splits):
        err.print(notice)
    s = splits[split]
    cfg = IndexConfig(kind=kind, nlist=nlist, m=m, nprobe=nprobe)
    if faiss_gpu_count() == 0:
        err.print("notice: FAISS has no GPU support here; building on CPU")
    if (sparse := cfg.sparse_training(len(s))) is not None:
        err.print(f"notice: {sparse}")
    with err.status(f"building {kind} index over {len(s)} vectors"):
        built = build_index(s.feats, cfg)
    save_index(built, out, index_meta(cfg, str(features), split, s.feats, s.pids))
    reloaded, meta = load_index(out, s.feats, s.pids)  # the reload check
    info = {
        "out": str(out),
        "kind": kind,
        "ntotal": int(reloaded.ntotal),
        "dim": int(reloaded.d),
        "exact": meta["exact"],
    }
    if json_out:
        print_json(info)
        return
    print_table(f"index → {out}", ["field", "value"], list(info.items()))


def register(app: typer.Typer) -> None:
    app.command()(index)
