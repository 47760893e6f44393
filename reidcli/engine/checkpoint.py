"""Run folders: resolved config, atomic resumable checkpoints, final safetensors weights, metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reidcli.errors import FormatError
from reidcli.fileio import atomic_path, write_json_atomic

__all__ = ["RunFiles", "save_checkpoint", "load_checkpoint", "save_weights", "load_run_model"]


class RunFiles:
    """The file names inside ``runs/<name>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.checkpoint = self.root / "checkpoint.pt"
        self.weights = self.root / "model.safetensors"
        self.metrics = self.root / "metrics.jsonl"
        self.curves = self.root / "curves.png"
        self.done = self.root / "DONE"


def save_checkpoint(path: Path, state: dict) -> None:
    """Tensors and plain values only, so that loading works with ``weights_only=True``."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FormatError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start over, or restore it"
        ) from e


def save_weights(path: Path, model: torch.nn.Module, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})


def write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, suffix=".jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (one per epoch); none if the file is not there yet."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise FormatError(f"{path} is damaged ({e}); restore it, or train into a new folder") from e


def read_run_config(run: str | Path) -> dict:
    files = RunFiles(run)
    if not files.config.is_file():
        raise FormatError(f"{files.root} is not a run folder (no config.json); train one with 'reid train'")
    try:
        config = json.loads(files.config.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise ValueError("no 'model' section")
    except ValueError as e:
        raise FormatError(f"{files.config} is not a run's config ({e}); restore it, or train into a new folder") from e
    return config


def load_run_model(run: str | Path, device: torch.device | str = "cpu"):
    """The trained model of a run folder (final weights, else the last checkpoint), in eval mode."""
    from safetensors.torch import load_file

    from reidcli.model.vit import ModelConfig, ViTReID

    files = RunFiles(run)
    config = read_run_config(run)
    model = ViTReID(ModelConfig.from_dict(config["model"]))
    if files.weights.is_file():
        state, source = load_file(str(files.weights)), files.weights
    elif files.checkpoint.is_file():
        state, source = load_checkpoint(files.checkpoint)["model"], files.checkpoint
    else:
        raise FormatError(f"{files.root} has no weights yet (model.safetensors or checkpoint.pt); train it first")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FormatError(
            f"weights in {source} do not fit the model in config.json ({str(e).splitlines()[0]}); "
            "the run folder is inconsistent"
        ) from e
    return model.to(device).eval(), config, source


__all__ += ["write_metrics", "read_metrics", "read_run_config", "write_json_atomic"]
