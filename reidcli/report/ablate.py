"""``reid ablate``: every (pe, loss, setting, seed) variant trained → extracted → evaluated, finished runs reused.

A setting is one value of each ``--vary OPTION=V1,V2`` (their product when several are given).

A run's folder name carries a hash of its resolved training config, so a changed option never reuses a stale run,
and an interrupted ablation resumes: finished runs (``DONE``) are read back, a run with a checkpoint continues.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from reidcli.data.augment import AUGMENT_FLAGS, AUGMENT_PARSERS
from reidcli.engine.checkpoint import RunFiles
from reidcli.engine.train import TrainConfig
from reidcli.errors import ConfigError
from reidcli.fileio import write_json_atomic
from reidcli.losses.combined import LossConfig

__all__ = ["AblationConfig", "Variant", "plan", "run_ablation", "summarize_runs", "parse_vary", "COLUMNS", "VARY"]

log = logging.getLogger(__name__)
COLUMNS = [
    "variant",
    "mAP",
    "ΔmAP",
    "Rank-1",
    "Rank-5",
    "Rank-10",
    "mINP",
    "mAP shifted",
    "PE params",
    "PE share",
    "train img/s",
    "final loss",
    "runs",
]

CROSS = ("mAP → ", "Rank-1 → ")  # per --test-data file: the variant's metrics there; the table shows the mAP


def cross_name(path: str | Path) -> str:
    """The column suffix of a ``--test-data`` file: its name without ``.h5``."""
    return Path(path).stem


def table_columns(summary: list[dict]) -> list[str]:
    """COLUMNS with each ``--test-data`` mAP after "mAP shifted", those some row has."""
    cross = [c for c in dict.fromkeys(k for r in summary for k in r) if c.startswith(CROSS[0]) and " std" not in c]
    at = COLUMNS.index("mAP shifted") + 1
    return [c for c in [*COLUMNS[:at], *cross, *COLUMNS[at:]] if any(c in r for r in summary)]


def _is_metric(col: str) -> bool:
    return col in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP", "mAP shifted") or col.startswith(CROSS)


# The options `--vary` sweeps: the training config's part that holds each (the flag is the field, dashed, except
# for the augmentation's: AUGMENT_FLAGS, e.g. --flip-prob sets AugmentConfig's flip).
VARY = {
    "run": (
        "lr",
        "weight_decay",
        "bias_lr_factor",
        "warmup_epochs",
        "freeze_epochs",
        "epochs",
        "batch",
        "k",
        "optimizer",
        "momentum",
        "schedule",
        "gamma",
    ),
    "model": (
        "depth",
        "dim",
        "heads",
        "stride",
        "drop_path",
        "neck_feat",
        "sie_weight",
        "jpm_groups",
        "jpm_shift",
        "jpm_shuffle",
        "head_scale",
        "head_margin",
    ),
    "loss": tuple(f for f in LossConfig.__dataclass_fields__ if f != "spec"),  # every loss option
    "augment": tuple(f for f in AUGMENT_FLAGS if f != "jitter_strength"),  # four numbers: not a comma list's item
}
_VARY_FIELD = {  # flag → (part, field)
    (AUGMENT_FLAGS[f] if part == "augment" else f.replace("_", "-")): (part, f)
    for part, fields in VARY.items()
    for f in fields
}


def parse_vary(text: str) -> tuple[str, tuple[str, ...]]:
    """``'rp-weight=0.5,1,2'`` → ``('rp-weight', ('0.5', '1', '2'))``; an option ``--vary`` cannot sweep is refused
    with the ones it can."""
    option, sep, values = text.partition("=")
    option = option.strip().removeprefix("--")
    parts = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not option or not parts:
        raise ConfigError(f"--vary {text!r}: give OPTION=V1,V2,… (e.g. --vary rp-weight=0.5,1,2)")
    if option in ("pe", "loss", "seed", "seeds"):
        raise ConfigError(f"--vary {option}: --pe, --loss and --seeds have options of their own; list the values there")
    if option not in _VARY_FIELD:
        raise ConfigError(f"--vary cannot sweep {option!r}; it sweeps {', '.join(sorted(_VARY_FIELD))}")
    return option, parts


def apply_setting(cfg: TrainConfig, option: str, raw: str) -> TrainConfig:
    """``cfg`` with one ``--vary`` value, converted to the type of the option it replaces."""
    part, field = _VARY_FIELD[option]
    holder = cfg if part == "run" else getattr(cfg, part)
    current = getattr(holder, field)
    try:
        if field == "margin":  # None (soft margin) or a number
            value = None if raw.lower() in ("none", "soft") else float(raw)
        elif part == "augment" and field in AUGMENT_PARSERS:  # e.g. erase-area's LO-HI
            value = AUGMENT_PARSERS[field](raw)
        elif isinstance(current, bool) or not isinstance(current, (int, float)):
            value = raw
        else:
            value = type(current)(raw)
    except ValueError:
        raise ConfigError(f"--vary {option}={raw}: not a {type(current).__name__}") from None
    if part == "run":
        return replace(cfg, **{field: value})
    return replace(cfg, **{part: replace(holder, **{field: value})})


@dataclass(frozen=True)
class AblationConfig:
    out: str
    template: TrainConfig  # every option but pe, loss, seed, the --vary ones and run_dir
    pes: tuple[str, ...] = ("ape", "rpe", "both")
    losses: tuple[str, ...] = ("ce+triplet",)
    seeds: tuple[int, ...] = (0,)
    perturb: float = 0.1  # query misalignment for the robustness column (fraction of the image); 0 = off
    flip: bool = True
    vary: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (option, its values) per --vary
    test_data: tuple[str, ...] = ()  # other datasets each variant is also evaluated on (query and gallery)

    def validate(self) -> AblationConfig:
        if not self.pes or not self.losses or not self.seeds:
            raise ConfigError("--pe, --loss and --seeds each need at least one value")
        lists = [("--pe", self.pes), ("--loss", self.losses), ("--seeds", self.seeds)]
        lists += [(f"--vary {option}", values) for option, values in self.vary]
        for option, values in lists:
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # one run folder would be counted as two seeds or variants
                raise ConfigError(f"{option} lists {', '.join(twice)} more than once; give each value once")
        options = [option for option, _ in self.vary]
        if len(set(options)) < len(options):
            raise ConfigError("--vary names one option twice; list all its values in one --vary")
        for v in plan(self):
            v.train.validate()
        if not 0.0 <= self.perturb < 0.5:
            raise ConfigError("--perturb must be in [0, 0.5)")
        self._check_test_data()
        return self

    def _check_test_data(self) -> None:
        """Each ``--test-data`` file before any training: readable, query and gallery present, at the model's image
        size, one column name each, not ``--data`` itself; no camera embedding (its cameras are ``--data``'s)."""
        from reidcli.data.store import read_dataset

        if not self.test_data:
            return
        if self.template.model.sie_cameras:
            raise ConfigError(
                "--test-data with --sie: the camera embeddings belong to --data's cameras, not another dataset's; "
                "leave out --sie or --test-data"
            )
        names = [cross_name(p) for p in self.test_data]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--test-data names {', '.join(twice)} twice (columns are named by file); rename one")
        for path in self.test_data:
            if Path(path).resolve() == Path(self.template.data).resolve():
                raise ConfigError(f"--test-data {path} is --data itself, which every variant is evaluated on already")
            attrs, _ = read_dataset(path, ("query", "gallery"), images=False)
            size, want = tuple(attrs["image_size"]), tuple(self.template.model.image_size)
            if size != want:
                raise ConfigError(
                    f"--test-data {path} holds {size[0]}x{size[1]} images but the models take {want[0]}x{want[1]}; "
                    f"prepare it at {want[0]}x{want[1]} ('reid prepare --image-size {want[0]}x{want[1]}')"
                )


@dataclass(frozen=True)
class Variant:
    pe: str
    loss: str
    seed: int
    train: TrainConfig
    setting: tuple[tuple[str, str], ...] = ()  # (option, value) per --vary

    @property
    def label(self) -> str:
        return " · ".join([self.pe, self.loss, *(f"{option} {value}" for option, value in self.setting)])

    @property
    def tag(self) -> str:
        """The label as a file-name part: ``ape__ce-triplet`` (``__rp-weight-0.5`` per setting)."""
        parts = [self.pe, self.loss.replace("+", "-"), *(f"{o}-{v}" for o, v in self.setting)]
        return "__".join(p.replace("/", "-") for p in parts)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir)


def _config_hash(cfg: TrainConfig) -> str:
    d = cfg.to_dict()
    d.pop("run_dir")
    d.pop("device")
    if d["precision"] == "auto":  # keyed as before --precision existed, so earlier ablation folders are still reused
        del d["precision"]
        d["bf16"] = True
    if not d["model"]["sie_cameras"]:  # keyed as before SIE existed, so earlier ablation folders are still reused
        del d["model"]["sie_cameras"], d["model"]["sie_weight"]
    if not d["model"]["jpm"]:  # likewise before JPM
        for key in ("jpm", "jpm_groups", "jpm_shift", "jpm_shuffle"):
            del d["model"][key]
    if not d["extra_data"]:  # likewise before --extra-data
        del d["extra_data"]
    if not d["combine_all"]:  # likewise before --combine-all
        del d["combine_all"]
    if d["model"]["id_head"] == "linear":  # likewise before the cosine ID heads
        for key in ("id_head", "head_scale", "head_margin"):
            del d["model"][key]
    if not d["freeze_epochs"]:  # likewise before --freeze-epochs
        del d["freeze_epochs"]
    if "center" not in cfg.loss.names:  # likewise before the center loss
        del d["loss"]["center_weight"], d["loss"]["center_lr"]
    if d["augment"]["erase_fill"] == "grey":  # likewise before --erase-fill
        del d["augment"]["erase_fill"]
    if not d["augment"]["jitter"]:  # likewise before the colour jitter
        del d["augment"]["jitter"], d["augment"]["jitter_strength"]
    if d["bias_lr_factor"] == 1.0:  # likewise before --bias-lr-factor
        del d["bias_lr_factor"]
    if d["schedule"] == "cosine":  # likewise before --schedule step
        del d["schedule"], d["milestones"], d["gamma"]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def plan(cfg: AblationConfig) -> list[Variant]:
    out = []
    settings = list(itertools.product(*[[(option, v) for v in values] for option, values in cfg.vary]))
    for loss in cfg.losses:
        for pe in cfg.pes:
            for setting in settings:
                for seed in cfg.seeds:
                    t = replace(
                        cfg.template,
                        model=replace(cfg.template.model, pe=pe),
                        seed=seed,
                        loss=replace(cfg.template.loss, spec=loss),
                        run_dir="",
                    )
                    for option, value in setting:
                        t = apply_setting(t, option, value)
                    v = Variant(pe, loss, seed, t, setting)
                    runs = Path(cfg.out) / "runs"
                    name = f"{v.tag}__s{seed}__{_config_hash(t)}"
                    run = _finished_twin(runs, name) or runs / name
                    out.append(replace(v, train=replace(t, run_dir=str(run))))
    return out


def _finished_twin(runs: Path, name: str) -> Path | None:
    """A finished run folder with ``name``'s key (the hash of the whole training config) under another name, when
    ``name`` itself is not there: the same training, e.g. a plain run that a ``--vary`` variant at the default value
    repeats (or the reverse). It is reused instead of trained again."""
    if (runs / name).exists():
        return None
    key = name.rsplit("__", 1)[-1]
    return next((d for d in sorted(runs.glob(f"*__{key}")) if RunFiles(d).done.is_file()), None)


def _run_variant(v: Variant, cfg: AblationConfig, on_step) -> dict:
    """Train (or resume), extract and evaluate one variant; return its result row (cached in results.json)."""
    from reidcli.engine.checkpoint import load_run_model
    from reidcli.engine.extract import embed_dataset
    from reidcli.engine.train import train
    from reidcli.model.vit import parameter_report
    from reidcli.report.compare import write_per_query
    from reidcli.retrieval.evaluate import EvalConfig, evaluate, resolve_device
    from reidcli.retrieval.features import write_features

    files = RunFiles(v.run_dir)
    cached = v.run_dir / "results.json"
    device = resolve_device(v.train.device)
    if files.done.is_file() and cached.is_file():
        row = {**json.loads(cached.read_text()), "variant": v.label, **dict(v.setting)}
        missing = [p for p in cfg.test_data if CROSS[0] + cross_name(p) not in row]
        if missing:  # a finished run, a --test-data it has not been evaluated on: only that evaluation
            model, _, _ = load_run_model(v.run_dir, device)
            for path in missing:
                row.update(_cross_metrics(model, v, cfg, path, device))
            write_json_atomic(cached, row)  # every dataset's columns kept, for the next ablation that asks
        wanted = {c + cross_name(p) for p in cfg.test_data for c in CROSS}
        return {k: x for k, x in row.items() if not k.startswith(CROSS) or k in wanted}  # this ablation's columns
    result = train(v.train, resume=files.checkpoint.is_file(), on_step=on_step)
    model, _, _ = load_run_model(v.run_dir, device)
    feats = embed_dataset(model, v.train.data, ("query", "gallery"), device, flip=cfg.flip, precision=v.train.precision)
    write_features(v.run_dir / "features.h5", feats, {"dataset_file": str(v.train.data), "flip": int(cfg.flip)})
    metrics = evaluate(feats["query"], feats["gallery"], EvalConfig(engine="torch", device=str(device))).metrics
    write_per_query(v.run_dir / "per_query.csv", feats["query"], metrics.per_query)  # for 'reid compare RUN RUN'
    row = {
        "variant": v.label,
        "pe": v.pe,
        "loss": v.loss,
        **dict(v.setting),
        "seed": v.seed,
        "run": str(v.run_dir),
        "mAP": metrics.mAP,
        "Rank-1": metrics.cmc[0],
        "Rank-5": metrics.cmc[4],
        "Rank-10": metrics.cmc[9],
        "mINP": metrics.mINP,
    }
    if cfg.perturb > 0:
        row["mAP shifted"] = _shifted_map(model, v, cfg, feats["gallery"], device)
    for path in cfg.test_data:
        row.update(_cross_metrics(model, v, cfg, path, device))
    params = parameter_report(model)
    last = result.metrics[-1]
    row.update(
        {
            "PE params": params["pe"],
            "PE share": params["pe_share"],
            "total params": params["total"],
            "train img/s": float(np.mean([m["images_per_s"] for m in result.metrics])),
            "final loss": last["loss"],
        }
    )
    write_json_atomic(cached, row)
    files.done.write_text(_config_hash(v.train) + "\n")
    return row


def _shifted_map(model, v: Variant, cfg: AblationConfig, gallery, device) -> float:
    """mAP when every query crop is misaligned (shifted down and right, as a detector error), gallery unchanged."""
    from reidcli.data.store import read_dataset
    from reidcli.engine.extract import embed_images
    from reidcli.retrieval.evaluate import EvalConfig, evaluate
    from reidcli.retrieval.features import FeatureSplit

    _, parts = read_dataset(v.train.data, ("query",))
    q = parts["query"]
    h, w = q.images.shape[1:3]
    dy, dx = int(round(cfg.perturb * h)), int(round(cfg.perturb * w))
    shifted = np.zeros_like(q.images)
    shifted[:, dy:, dx:] = q.images[:, : h - dy, : w - dx]
    feats = FeatureSplit(
        embed_images(model, shifted, device, flip=cfg.flip, precision=v.train.precision, camids=q.camids),
        q.pids,
        q.camids,
    )
    return evaluate(feats, gallery, EvalConfig(engine="torch", device=str(device))).metrics.mAP


def _cross_metrics(model, v: Variant, cfg: AblationConfig, path: str, device) -> dict:
    """mAP and Rank-1 on another dataset's query and gallery (direct transfer, as torchreid's and fast-reid's
    several test sets): the columns ``mAP → NAME`` and ``Rank-1 → NAME``."""
    from reidcli.engine.extract import embed_dataset
    from reidcli.retrieval.evaluate import EvalConfig, evaluate

    feats = embed_dataset(model, path, ("query", "gallery"), device, flip=cfg.flip, precision=v.train.precision)
    metrics = evaluate(feats["query"], feats["gallery"], EvalConfig(engine="torch", device=str(device))).metrics
    return {CROSS[0] + cross_name(path): metrics.mAP, CROSS[1] + cross_name(path): metrics.cmc[0]}


def summarize_runs(rows: list[dict], options: tuple[str, ...] = ()) -> list[dict]:
    """Mean ± std over seeds per variant (pe, loss and the ``--vary`` ``options``' values)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if "variant" not in df:  # rows written before --vary
        df["variant"] = df["pe"] + " · " + df["loss"]
    out = []
    metric_cols = [c for c in df.columns if _is_metric(c)]
    for variant, g in df.groupby("variant", sort=False):
        first = g.iloc[0]
        row = {"variant": variant, "pe": first["pe"], "loss": first["loss"], **{o: first[o] for o in options}}
        row["runs"] = len(g)
        for c in metric_cols:
            row[c] = float(g[c].mean())
            row[c + " std"] = float(g[c].std(ddof=0)) if len(g) > 1 else 0.0
        for c in ("PE params", "PE share", "train img/s", "final loss"):
            row[c] = float(g[c].mean())
        out.append(row)
    return out


def _paired_deltas(summary: list[dict], rows: list[dict], resamples: int = 10_000) -> None:
    """Each variant's mAP minus the first variant's, with a 95% paired-bootstrap interval (seeds paired by number;
    with several, the bootstrap draws seeds and then queries), from the runs' ``per_query.csv``: ``ΔmAP``,
    ``ΔmAP low``, ``ΔmAP high`` in the summary rows. Skipped for runs made before those files were written."""
    from reidcli.report.compare import compare_runs, read_per_query

    read = functools.cache(read_per_query)  # the first variant's files serve every comparison: read them once
    runs: dict[tuple, dict] = {}
    for r in rows:
        runs.setdefault(r["variant"], {})[r["seed"]] = Path(r["run"]) / "per_query.csv"
    base = runs[summary[0]["variant"]]
    for row in summary[1:]:
        mine = runs[row["variant"]]
        pairs = [(base[s], mine[s]) for s in mine if s in base]
        if not pairs or not all(a.is_file() and b.is_file() for a, b in pairs):
            continue
        m_ap = compare_runs([(read(a), read(b)) for a, b in pairs], resamples).rows[0]
        row.update({"ΔmAP": m_ap["delta"], "ΔmAP low": m_ap["low"], "ΔmAP high": m_ap["high"]})


def run_ablation(
    cfg: AblationConfig,
    on_variant: Callable[[int, int, Variant], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Run (or reuse) every variant; write results.csv, results.md and the pictures; return the summary rows."""
    cfg.validate()
    variants = plan(cfg)
    rows = []
    for i, v in enumerate(variants):
        if on_variant:
            on_variant(i, len(variants), v)
        rows.append(_run_variant(v, cfg, on_step))
    summary = summarize_runs(rows, tuple(option for option, _ in cfg.vary))
    _paired_deltas(summary, rows)
    _write_tables(Path(cfg.out), summary, rows)
    _write_pictures(Path(cfg.out), variants)
    _write_summary_picture(Path(cfg.out), summary, rows)
    return summary


def _write_tables(out: Path, summary: list[dict], rows: list[dict]) -> None:
    import pandas as pd

    from reidcli.fileio import atomic_path

    df = pd.DataFrame(summary)
    with atomic_path(out / "results.csv", suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "runs.csv", suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(out / "results.md", suffix=".md") as tmp:
        tmp.write_text(markdown_table(summary) + "\n")


def format_cell(row: dict, col: str) -> str:
    v = row.get(col)
    if v is None:
        return "—"
    if _is_metric(col):
        std = row.get(col + " std", 0.0)
        return f"{100 * v:.1f} ± {100 * std:.1f}" if row.get("runs", 1) > 1 else f"{100 * v:.1f}"
    if col == "ΔmAP":  # against the first variant, with its 95% paired-bootstrap interval
        return f"{100 * v:+.1f} [{100 * row['ΔmAP low']:+.1f}, {100 * row['ΔmAP high']:+.1f}]"
    if col == "PE share":
        return f"{100 * v:.2f}%"
    if col == "PE params":
        return f"{int(v):,}"
    if col == "train img/s":
        return f"{v:.0f}"
    if col == "final loss":
        return f"{v:.3f}"
    return str(v)


def markdown_table(summary: list[dict]) -> str:
    cols = table_columns(summary)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(format_cell(r, c) for c in cols) + " |" for r in summary]
    return "\n".join(lines)


def _write_pictures(out: Path, variants: list[Variant]) -> None:
    from reidcli.report.figures import variant_pictures

    seen = set()
    for v in variants:
        if v.label in seen:
            continue
        seen.add(v.label)
        try:
            variant_pictures(v, out / "pictures")
        except Exception as e:  # noqa: BLE001 — a picture must never fail a finished ablation
            log.warning("pictures for %s failed: %s", v.label, e)


def _write_summary_picture(out: Path, summary: list[dict], rows: list[dict]) -> None:
    """``pictures/summary.png``: the table's mAP, Rank-1 and ΔmAP as bars and intervals, and the loss curves."""
    from reidcli.engine.checkpoint import RunFiles, read_metrics
    from reidcli.report.plots import plot_ablation_summary

    curves: dict[str, list[list[dict]]] = {}
    for r in rows:
        curves.setdefault(r["variant"], []).append(read_metrics(RunFiles(r["run"]).metrics))
    try:
        plot_ablation_summary(summary, curves, out / "pictures" / "summary.png")
    except Exception as e:  # noqa: BLE001 — a picture must never fail a finished ablation
        log.warning("the summary picture failed: %s", e)
