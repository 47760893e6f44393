"""``reid evaluate``: Market-1501 protocol CMC / mAP / mINP, optional re-ranking, ranked-list pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reidcli.cli.console import err, print_json, print_table
from reidcli.cli.options import DeviceOpt, JsonOpt, check_out_folder, given_options, refuse_unused


def evaluate(
    ctx: typer.Context,
    features: Annotated[Path, typer.Argument(help="Features HDF5 with query and gallery groups.")],
    index: Annotated[
        Path | None, typer.Option(help="FAISS index from 'reid index' (default: flat, on the fly).")
    ] = None,
    engine: Annotated[str, typer.Option(help="faiss (ranked lists + exact counting) or torch (all exact).")] = "faiss",
    depth: Annotated[int, typer.Option(help="faiss: ranked-list length.")] = 100,
    max_rank: Annotated[int, typer.Option(help="Longest CMC rank reported.")] = 50,
    rerank: Annotated[bool, typer.Option(help="k-reciprocal re-ranking (Zhong et al. 2017).")] = False,
    k1: Annotated[int, typer.Option(help="re-ranking k1.")] = 20,
    k2: Annotated[int, typer.Option(help="re-ranking k2.")] = 6,
    lambda_value: Annotated[float, typer.Option("--lambda", help="re-ranking weight of the original distance.")] = 0.3,
    aqe: Annotated[
        bool,
        typer.Option(
            help="α-query expansion first: each query and gallery feature becomes the weighted mean of its --aqe-k "
            "nearest (fast-reid's AQE)."
        ),
    ] = False,
    aqe_k: Annotated[int, typer.Option(help="AQE: neighbours averaged (itself included).")] = 5,
    aqe_alpha: Annotated[float, typer.Option(help="AQE: weight exponent, weights max(similarity, 0)^alpha.")] = 3.0,
    device: DeviceOpt = "auto",
    similarity: Annotated[
        str,
        typer.Option(
            help="GPU similarity GEMM: auto (tensor cores at float32 accuracy), fp32 (plain float32 GEMM), split, "
            "fp16; the CPU always runs fp32."
        ),
    ] = "auto",
    roc: Annotated[
        bool,
        typer.Option(
            help="Also the verification view: TPR at fixed FPRs over every query-gallery pair, one global threshold "
            "(fast-reid's TEST.ROC)."
        ),
    ] = False,
    fpr: Annotated[str, typer.Option(help="--roc: comma-separated false-positive rates.")] = "1e-4,1e-3,1e-2",
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json, results.csv, per_query.csv and pictures.")
    ] = None,
    visualize: Annotated[int, typer.Option(help="Write ranked lists of this many queries (needs --out).")] = 0,
    top_k: Annotated[int, typer.Option(help="Gallery images per ranked list picture.")] = 10,
    show: Annotated[
        str,
        typer.Option(
            help="--visualize: which queries: spread (evenly over the query set), worst or best (lowest or highest "
            "AP first, each labelled with its AP: fast-reid's vis-mode back / front)."
        ),
    ] = "spread",
    data: Annotated[Path | None, typer.Option(help="Dataset HDF5 for pictures (default: from the features).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate retrieval under the Market-1501 protocol (same pid + camera removed, queries without a match
    skipped). CMC, mAP and mINP are exact for a flat index at any gallery size.

    Examples:

      reid evaluate feats/rpe.h5

      reid evaluate feats/rpe.h5 --index feats/rpe.faiss --json

      reid evaluate feats/rpe.h5 --rerank --out results/rpe --visualize 8

      reid evaluate feats/rpe.h5 --aqe --rerank       # fast-reid's test-time AQE, then re-ranking

      reid evaluate feats/rpe.h5 --roc                # + TPR at FPR 1e-4, 1e-3, 1e-2 over all pairs
    """
    from reidcli.errors import ConfigError
    from reidcli.report.compare import write_per_query
    from reidcli.retrieval.evaluate import EvalConfig
    from reidcli.retrieval.evaluate import evaluate as run_eval
    from reidcli.retrieval.features import read_features, renormalised_notice
    from reidcli.retrieval.roc import parse_fprs

    if visualize < 0 or top_k < 1:
        raise ConfigError(
            f"--visualize {visualize} --top-k {top_k}: give a number of queries (0: no pictures) and of gallery images"
            " per list (at least 1)"
        )
    if visualize and out is None:
        raise ConfigError("--visualize needs --out DIR for the pictures")
    refuse_unused(ctx, ("k1", "k2", "lambda_value"), rerank, "--rerank", "add --rerank")
    refuse_unused(ctx, ("aqe_k", "aqe_alpha"), aqe, "--aqe", "add --aqe")
    refuse_unused(ctx, ("fpr",), roc, "--roc", "add --roc")
    if aqe and index is not None:
        raise ConfigError(
            "--index holds the gallery features before --aqe expands them; leave out --index (a flat search runs "
            "on the expanded features)"
        )
    refuse_unused(ctx, ("top_k", "data", "show"), visualize > 0, "--visualize N", "add --visualize N (and --out DIR)")
    if show not in SHOW_CHOICES:
        raise ConfigError(f"unknown --show {show!r}; choose one of {', '.join(SHOW_CHOICES)}")
    if rerank and engine == "faiss" and "engine" in given_options(ctx):
        raise ConfigError(
            "--engine faiss has no effect with --rerank (re-ranking scores every pair in torch); leave --engine out "
            "or drop --rerank"
        )
    exact_scores = "--rerank" if rerank else "--engine torch" if engine == "torch" else None
    refuse_unused(
        ctx,
        ("index", "depth"),
        exact_scores is None,
        f"the faiss engine's ranked lists ({exact_scores} scores every gallery image itself)",
        f"drop {exact_scores}",
    )
    if out is not None:
        check_out_folder(out)
    cfg = EvalConfig(
        engine=engine,
        depth=depth,
        max_rank=max_rank,
        rerank=rerank,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        aqe=aqe,
        aqe_k=aqe_k,
        aqe_alpha=aqe_alpha,
        device=device,
        similarity=similarity,
        roc=parse_fprs(fpr) if roc else (),
    ).validate()
    attrs, splits = read_features(features)
    if notice := renormalised_notice(features, splits):
        err.print(notice)
    images = _picture_source(data, attrs) if visualize else None  # checked before the work, not after
    built = _load_index(index, splits["gallery"]) if index else None
    result = run_eval(splits["query"], splits["gallery"], cfg, built)
    if result.engine.startswith("faiss") and not json_out:
        from reidcli.retrieval.index import faiss_gpu_count

        if faiss_gpu_count() == 0:
            hint = "; --engine torch evaluates on the GPU" if "cuda" in result.device else ""
            err.print(f"notice: FAISS retrieval ran on the CPU (this FAISS has no GPU support){hint}")
    report = {**result.metrics.to_dict(), "seconds": result.seconds, "engine": result.engine, "device": result.device}
    if result.roc is not None:
        report["roc"] = {**result.roc.to_dict(), "seconds": result.roc_seconds}
    if out is not None:
        provenance = {
            "features": str(features),
            "rerank": {"k1": k1, "k2": k2, "lambda": lambda_value} if rerank else None,
            "aqe": {"k": aqe_k, "alpha": aqe_alpha} if aqe else None,
            **{k: attrs[k] for k in ("dataset", "run", "checkpoint_sha256") if k in attrs},
        }
        _write_results(out, report, provenance)
        write_per_query(out / "per_query.csv", splits["query"], result.metrics.per_query)
        if result.roc is not None:
            _write_roc(out, result.roc, features.name)
        if visualize:
            # the lists as evaluated: with --aqe, from the expanded features
            shown = dict(zip(("query", "gallery"), result.expanded, strict=True)) if result.expanded else splits
            _pictures(out, shown, images, visualize, top_k, cfg if rerank else None, show, result.metrics.per_query)
    if json_out:
        print_json(report)
        return
    m = result.metrics
    cmc = m.cmc
    rows = [("mAP", m.mAP), ("mINP", m.mINP), ("random-ranking mAP", m.chance_mAP)] + [
        (f"Rank-{r}", cmc[r - 1]) for r in (1, 5, 10, 20) if r <= len(cmc)
    ]
    if result.roc is not None:
        rows += list(result.roc.named().items())
    rows += [("valid queries", f"{m.num_valid_queries}/{m.num_queries}"), ("seconds", round(result.seconds, 4))]
    title = f"{features.name}: {result.engine} on {result.device}" + (" (approximate)" if m.approximate else "")
    print_table(title, ["metric", "value"], rows)


def _load_index(path: Path, gallery):
    from reidcli.retrieval.index import load_index

    built, _ = load_index(path, gallery.feats, gallery.pids)
    return built


def _write_results(out: Path, report: dict, provenance: dict) -> None:
    """results.json: the metrics and what they were computed from; results.csv: the metrics in one row."""
    import pandas as pd

    from reidcli.fileio import atomic_path, write_json_atomic

    write_json_atomic(out / "results.json", {**report, **provenance})
    flat = {k: v for k, v in report.items() if k not in ("cmc", "roc")}
    if "roc" in report:  # fast-reid's column names
        flat.update({f"TPR@FPR={f:.0e}": t for f, t in zip(report["roc"]["fpr"], report["roc"]["tpr"], strict=True)})
    flat.update({f"rank{r}": report["cmc"][r - 1] for r in (1, 5, 10, 20) if r <= len(report["cmc"])})
    with atomic_path(out / "results.csv", suffix=".csv") as tmp:
        pd.DataFrame([flat]).to_csv(tmp, index=False)


def _write_roc(out: Path, roc, name: str) -> None:
    """roc.csv (the curve: fpr, tpr) and roc.png."""
    import pandas as pd

    from reidcli.fileio import atomic_path
    from reidcli.report.plots import plot_roc

    with atomic_path(out / "roc.csv", suffix=".csv") as tmp:
        pd.DataFrame({"fpr": roc.curve_fpr, "tpr": roc.curve_tpr}).to_csv(tmp, index=False)
    plot_roc(
        roc, out / "roc.png", title=f"{name}: ROC over {roc.positives:,} positive, {roc.negatives:,} negative pairs"
    )


def _picture_source(data: Path | None, attrs: dict) -> Path:
    """The dataset file whose images the pictures show: --data, else the one the features file names."""
    from reidcli.errors import ConfigError

    source = data or attrs.get("dataset_file")
    if not source:
        raise ConfigError("--visualize needs the dataset images: pass --data FILE (the dataset HDF5)")
    if not Path(source).is_file():
        raise ConfigError(f"--visualize needs the dataset images, but {source} is not there; pass --data FILE")
    return Path(source)


SHOW_CHOICES = ("spread", "worst", "best")


def _pictures(out: Path, splits, data: Path, n: int, top_k: int, rerank, show: str, per_query) -> None:
    from reidcli.report.ranked import queries_by_ap, write_ranked_lists

    rows = labels = None
    note = {"worst": ", lowest AP first", "best": ", highest AP first"}.get(show, "")
    if show != "spread":
        rows, labels = queries_by_ap(per_query, n, worst=show == "worst")
    q, g = splits["query"], splits["gallery"]
    write_ranked_lists(out / "ranked_lists.png", q, g, data, n, top_k, rerank, rows, labels, note)


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
