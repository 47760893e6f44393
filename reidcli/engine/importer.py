"""``reid import``: a trained ReID ViT from another tool (TransReID, timm-format) as a run folder.

The run folder holds ``config.json`` (the model config inferred from the weights) and ``model.safetensors``, so that
``extract``, ``evaluate``, ``search``, ``export`` and ``plot`` work on it as on a run trained here: e.g. TransReID's
released Market-1501 models evaluated with this protocol, re-ranking and pictures.

TransReID's checkpoints keep its backbone under ``base.`` (timm's ViT names), the BNNeck as ``bottleneck`` and the ID
classifier as ``classifier``; with its jigsaw patch module (JPM) the global branch's last block and norm are ``b1``
(the backbone's own last block is then unused), the local branch's ``b2``, and the groups' BNNecks and classifiers
``bottleneck_1…4`` and ``classifier_1…4``; its camera embedding (SIE) is ``base.sie_embed``.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from reidcli.errors import ConfigError, FormatError
from reidcli.model.vit import ModelConfig, ViTReID

__all__ = ["ImportOptions", "ImportResult", "import_run", "infer_model_config", "rename_transreid"]

log = logging.getLogger(__name__)
_DROPPED = ("head.", "fc.", "fc_norm.", "head_drop.", "pre_logits.")  # a classification head of another task


@dataclass(frozen=True)
class ImportOptions:
    image_size: tuple[int, int] = (256, 128)
    stride: int | None = None  # None: the one that gives the weights' APE length (TransReID's *_stride models: 12)
    heads: int | None = None  # None: width / 64 (ViT-S 6, ViT-B 12)
    pe: str | None = None  # None: from the weights (APE table, relative tables)
    neck_feat: str = "before"  # TransReID's TEST.NECK_FEAT default
    sie_weight: float = 3.0  # TransReID's SIE_COE
    jpm_shift: int = 4  # TransReID's SHIFT_NUM 5
    jpm_shuffle: int = 2  # TransReID's SHUFFLE_GROUP


@dataclass(frozen=True)
class ImportResult:
    out: Path
    config: ModelConfig
    initialised: list[str]  # parameters the weights did not hold (left at their initial values)
    dropped: list[str]  # tensors of the weights this model has no place for


def _depth(state: dict[str, torch.Tensor]) -> int:
    """1 + the largest ``blocks.N.`` index among the keys (0 without blocks)."""
    return 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)


def rename_transreid(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefixes stripped (``module.``, ``base.``, …) and TransReID's JPM names mapped to ours."""
    from reidcli.model.weights import strip_prefixes

    out = strip_prefixes(state)
    depth = _depth(out)
    renamed, branches = {}, {}
    for key, value in out.items():
        m = re.match(r"(b1|b2)\.(0|1)\.(.+)", key)
        if m:  # b1: the global branch's last block and norm (in place of the backbone's, unused); b2: the JPM's
            branch, part, rest = m.groups()
            if branch == "b1":
                branches[f"blocks.{depth - 1}.{rest}" if part == "0" else f"norm.{rest}"] = value
            else:
                branches[f"jpm_block.{rest}" if part == "0" else f"jpm_norm.{rest}"] = value
            continue
        if m := re.match(r"(bottleneck|classifier)_(\d+)\.(.+)", key):
            name, i, rest = m.groups()
            key = f"jpm_{name}s.{int(i) - 1}.{rest}"
        if key == "pos_embed":
            key = "pos.pos_embed"
        if m := re.match(r"blocks\.(\d+)\.attn\.relative_position_bias_table$", key):  # BEiT's per-block table
            key = f"rel_pos.{m.group(1)}.relative_position_bias_table"
        renamed[key] = value
    return renamed | branches


def _stride_for(tokens: int, image_size: tuple[int, int], patch: int) -> int | None:
    """The stride (patch size down to 1) whose grid has ``tokens`` patches at ``image_size``."""
    h, w = image_size
    for s in range(patch, 0, -1):
        if ((h - patch) // s + 1) * ((w - patch) // s + 1) == tokens:
            return s
    return None


def infer_model_config(
    state: dict[str, torch.Tensor], options: ImportOptions, source: str = "the weights"
) -> ModelConfig:
    """The model the renamed ``state`` belongs to: width, depth, patch, MLP ratio, position encoding, stride (from
    the APE's length at ``image_size``), JPM, SIE cameras and classes from the tensors' names and shapes."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise FormatError(
            f"{source} holds no ViT (no cls_token and patch_embed.proj.weight, after the prefixes module., base., "
            "backbone., model., encoder.); pass a ViT's state dict (TransReID, timm)"
        )
    dim = int(state["cls_token"].shape[-1])
    proj = state["patch_embed.proj.weight"]
    patch = int(proj.shape[-1])
    if proj.shape[-2] != proj.shape[-1]:
        raise FormatError(f"the patch embedding is {tuple(proj.shape[-2:])}: only square patches are read")
    depth = _depth(state)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    has_ape = "pos.pos_embed" in state
    has_rpe = any(k.startswith("rel_pos.") for k in state)
    pe = options.pe or ("both" if has_ape and has_rpe else "ape" if has_ape else "rpe" if has_rpe else "none")
    stride = options.stride
    if stride is None:
        stride = patch
        if has_ape:
            tokens = int(state["pos.pos_embed"].shape[1]) - 1  # CLS is the one prefix token
            found = _stride_for(tokens, options.image_size, patch)
            if found is None:
                h, w = options.image_size
                raise ConfigError(
                    f"the weights' APE has {tokens} patches, which no stride of {patch}px patches gives at {h}x{w}; "
                    f"pass the --image-size they were trained at (TransReID: 256x128, or 384x128 for its *_384 models)"
                )
            stride = found
    heads = options.heads or max(dim // 64, 1)
    jpm_groups = len({k.split(".")[1] for k in state if k.startswith("jpm_bottlenecks.")})
    classifier = state.get("classifier.weight")
    sie = state.get("sie_embed")
    return ModelConfig(
        pe=pe,
        image_size=tuple(options.image_size),
        patch_size=patch,
        stride=stride,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        drop_path=0.0,
        num_classes=int(classifier.shape[0]) if classifier is not None else 0,
        neck_feat=options.neck_feat,
        sie_cameras=int(sie.shape[0]) if sie is not None else 0,
        sie_weight=options.sie_weight,
        jpm="jpm_block.norm1.weight" in state,
        jpm_groups=jpm_groups or 4,
        jpm_shift=options.jpm_shift,
        jpm_shuffle=options.jpm_shuffle,
    ).validate()


def import_run(weights: str | Path, out: str | Path, options: ImportOptions = ImportOptions()) -> ImportResult:
    """Read ``weights``, infer the model, load it (every backbone tensor must fit), write the run folder atomically."""
    from reidcli.engine.checkpoint import RunFiles, save_weights, write_json_atomic
    from reidcli.engine.train import TrainConfig
    from reidcli.fileio import sha256_file
    from reidcli.model.weights import adapt_state, load_state_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; pass a new run folder")
    weights = Path(weights)
    state = rename_transreid(load_state_file(weights))
    other_head = sorted(k for k in state if k.startswith(_DROPPED))
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED)}
    cfg = infer_model_config(state, options, str(weights))
    model = ViTReID(cfg).eval()
    state = adapt_state(model, state, None)
    own = model.state_dict()
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if wrong:
        raise FormatError(
            f"{weights}: {wrong[0]} is {tuple(state[wrong[0]].shape)} but the inferred model wants "
            f"{tuple(own[wrong[0]].shape)}; check --heads, --image-size and --stride"
        )
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    head = ("bottleneck.", "classifier.", "jpm_bottlenecks.", "jpm_classifiers.")
    missing_body = [k for k in result.missing_keys if not k.startswith(head)]
    if missing_body:
        raise FormatError(
            f"{weights} lacks {len(missing_body)} tensor(s) of the backbone, e.g. {missing_body[0]}; "
            "is it a whole ViT (TransReID or timm format)?"
        )
    dropped = sorted([*other_head, *(k for k in state if k not in own)])
    digest = sha256_file(weights)
    config = TrainConfig(data="", run_dir=str(out), model=cfg, epochs=0).to_dict()
    config["imported_from"] = {"path": str(weights), "sha256": digest}
    partial = out.with_name(f".{out.name}.partial")  # renamed into place only when complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        files = RunFiles(partial)
        write_json_atomic(files.config, config)
        save_weights(files.weights, model, {"model": cfg.to_dict(), "epochs": 0, "imported_from": str(weights)})
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ImportResult(out, cfg, sorted(result.missing_keys), dropped)
