"""Initial weights from a timm-format ViT state dict (local file or timm's hub), resampled to our grid."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from reidcli.errors import FormatError, ReidError
from reidcli.model.vit import ViTReID

__all__ = ["load_state_file", "load_init_weights", "load_pretrained", "adapt_state", "strip_prefixes"]

log = logging.getLogger(__name__)
_PREFIXES = ("module.", "base.", "backbone.", "model.", "encoder.")
_SKIP = ("head.", "fc.", "classifier.", "bottleneck.", "fc_norm.")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` loaded with ``weights_only=True`` (no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"weights file {path} not found; pass an existing .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any loader failure means the same thing to the user
        raise FormatError(f"cannot read weights from {path} ({type(e).__name__}: {e}); is it a state dict?") from e
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path} does not hold a state dict of tensors")
    return state


def strip_prefixes(state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Keys without the wrappers' prefixes (``module.``, ``base.``, ``backbone.``, ``model.``, ``encoder.``), those
    starting with ``skip`` left out."""
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        if not k.startswith(skip):  # an empty tuple skips nothing
            out[k] = v
    return out


def adapt_state(
    model: ViTReID, state: dict[str, torch.Tensor], old_grid: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """Rename timm keys to ours and resample position tables and the patch kernel to this model's grid."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    own = model.state_dict()
    if "pos_embed" in state:
        state["pos.pos_embed"] = state.pop("pos_embed")
    pe = state.get("pos.pos_embed")
    if pe is not None and "pos.pos_embed" in own and pe.shape != own["pos.pos_embed"].shape:
        old = list(old_grid) if old_grid else _old_grid(model, pe.shape[1] - 1)  # CLS is the one prefix token
        state["pos.pos_embed"] = resample_abs_pos_embed(pe, list(model.cfg.grid), old, num_prefix_tokens=1)
        log.info("resampled APE %s -> %s", tuple(pe.shape), tuple(state["pos.pos_embed"].shape))
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
        state["patch_embed.proj.weight"] = resample_patch_embed(w, list(own["patch_embed.proj.weight"].shape[-2:]))
    for k in [k for k in state if k.startswith("blocks.") and k.endswith("relative_position_bias_table")]:
        state[f"rel_pos.{k.split('.')[1]}.relative_position_bias_table"] = state.pop(k)  # BEiT-style key
    for k in [k for k in state if k.startswith(("rel_pos.", "jpm_rel_pos."))]:
        target = own.get(k)
        if target is not None and state[k].shape != target.shape:
            state[k] = resize_rel_pos_bias_table(state[k], model.cfg.grid, target.shape, old_window_size=old_grid)
    sie = state.get("sie_embed")
    if sie is not None and ("sie_embed" not in own or sie.shape != own["sie_embed"].shape):
        state.pop("sie_embed")  # camera embeddings of another dataset (other cameras): this one's start fresh
        log.info("camera embeddings (SIE) %s of the weights left out: not this model's cameras", tuple(sie.shape))
    return state


def _old_grid(model: ViTReID, n: int) -> list[int]:
    """Guess the checkpoint's patch grid: square, or the model's aspect ratio."""
    h, w = model.cfg.grid
    side = int(round(n**0.5))
    if side * side == n:
        return [side, side]
    ratio = h / w
    gw = int(round((n / ratio) ** 0.5))
    return [n // gw, gw]


def load_init_weights(
    model: ViTReID, state: dict[str, torch.Tensor], old_grid: tuple[int, int] | None = None
) -> dict[str, list[str]]:
    """Load what fits (shape-checked after resampling); return the missing and unexpected keys.

    ``old_grid`` is the checkpoint's patch grid when known (our own runs); else it is inferred (square, or
    the model's aspect ratio).
    """
    state = adapt_state(model, strip_prefixes(state, _SKIP), old_grid)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if mismatched:
        raise FormatError(
            f"weights of another shape for {mismatched[0]} (and {len(mismatched) - 1} more); "
            "match --dim/--depth/--heads/--patch-size to the checkpoint"
        )
    if not usable:
        raise FormatError("none of the weights match this model; is it a ViT of the same width and depth?")
    result = model.load_state_dict(usable, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": sorted(k for k in state if k not in own)}


def _hub_unreachable() -> str | None:
    """Why timm's hub cannot be reached (a 3-second connection probe), or None. Offline, huggingface_hub retries
    every file with back-off (about 50 s, a warning per attempt) before failing; the probe fails at once. Skipped
    when ``HF_HUB_OFFLINE`` is set (the hub's cache answers without the network) and behind a proxy."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None  # behind a proxy a direct connection proves nothing: the hub's client goes through it
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host}:{port} unreachable: {e.strerror or type(e).__name__}"
    return None


def load_pretrained(model: ViTReID, timm_name: str) -> dict[str, list[str]]:
    """Weights of a timm model from its hub (needs network access, or ``HF_HUB_OFFLINE=1`` and the hub's cache)."""
    import logging

    fix = (
        "when offline, download the weights elsewhere and pass them with --init FILE (or set HF_HUB_OFFLINE=1 "
        "to use weights already in the hub's cache)"
    )
    if (why := _hub_unreachable()) is not None:
        raise ReidError(f"cannot fetch pretrained '{timm_name}' from timm's hub ({why}); {fix}")
    import timm

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # a flaky network: the hub logs a warning per retry before the one error below
    try:
        ref = timm.create_model(timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 — offline, unknown name, hub error: one message
        raise ReidError(f"cannot fetch pretrained '{timm_name}' from timm's hub ({type(e).__name__}); {fix}") from e
    finally:
        hub_log.setLevel(level)
    return load_init_weights(model, ref.state_dict())
