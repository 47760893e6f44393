"""Feature extraction: every image of a split embedded in dataset order, L2-normalised, written atomically."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reidcli.data.augment import normalize_batch
from reidcli.data.layouts import SPLITS
from reidcli.data.store import open_splits, read_dataset
from reidcli.engine.checkpoint import RunFiles, load_run_model
from reidcli.errors import ConfigError
from reidcli.fileio import sha256_file
from reidcli.model.vit import check_cameras
from reidcli.retrieval.evaluate import resolve_device
from reidcli.retrieval.features import FeatureSplit, write_features

__all__ = ["ExtractConfig", "embed_images", "embed_dataset", "extract_features", "resolve_precision"]


@dataclass(frozen=True)
class ExtractConfig:
    run: str
    data: str
    out: str
    splits: tuple[str, ...] = ("query", "gallery")
    batch: int = 256
    flip: bool = True
    # float32 by default: small from-scratch models give features with a large shared component (cosines ≈ 0.999),
    # whose rankings float16 rounding would change.
    dtype: str = "float32"
    device: str = "auto"
    precision: str = "auto"  # auto (CUDA fp16, CPU fp32), fp16 (CUDA only), bf16 autocast, fp32
    compile: bool = False
    cuda_graph: bool = True  # CUDA: each batch one graph replay (eager launches if the capture fails)

    def validate(self) -> ExtractConfig:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError("--dtype must be float16 or float32")
        if self.batch < 1:
            raise ConfigError("--batch must be positive")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise ConfigError(
                f"--splits {','.join(self.splits)!r}: {f'unknown split {unknown[0]!r}' if unknown else 'no split'}; "
                f"give a comma-separated list of {', '.join(SPLITS)} (default query,gallery)"
            )
        return self


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The forward precision actually run: ``auto`` is fp16 on CUDA and fp32 on the CPU; fp16 on the CPU runs fp32
    (CPUs have no fast float16 products); bf16 is autocast on either (the CPU's bf16 instructions: 1.6-1.7x fp32 for
    ViT-S/B on the test machine's AVX-512 cores, cosines within 6e-5 of fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto" or (precision == "fp16" and device.type != "cuda"):
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {key: (weight versions, forward)}


class _Embed:
    """The model's ``embed(x, flip)`` at one precision: eager, or (``graph``) replayed as one CUDA graph per input
    shape, so a batch costs one launch instead of a few hundred on a slow host.

    A graph is captured on first use of a shape, after two warm-up calls on a side stream, and checked once against
    the eager output of the same batch; a failed capture or a mismatch warns once and leaves the rest eager."""

    def __init__(self, fn, autocast: bool, graph: bool):
        self.fn, self.autocast, self.graph = fn, autocast, graph
        self.graphs: dict[tuple, tuple] = {}

    def eager(self, x: torch.Tensor, flip: bool, cams: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            return self.fn(x, flip=flip) if cams is None else self.fn(x, flip=flip, camids=cams)

    def __call__(self, x: torch.Tensor, flip: bool, cams: torch.Tensor | None = None) -> torch.Tensor:
        if not self.graph or cams is not None:  # a camera-embedding model (SIE) runs eagerly
            return self.eager(x, flip, cams)
        key = (tuple(x.shape), x.dtype, flip)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, flip)
        entry = self.graphs[key]
        if entry is None:  # the capture failed (and turned the graph off)
            return self.eager(x, flip)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor, flip: bool):
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, autotuning) happens outside the capture
                    reference = self.eager(static_in, flip)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.eager(static_in, flip)
            graph.replay()
            if not torch.allclose(static_out.float(), reference.float(), rtol=1e-3, atol=1e-3):
                raise RuntimeError("its output differs from the eager forward's")
        except Exception as e:  # noqa: BLE001 — any failure: the eager forward gives the same features
            import warnings

            self.graph = False
            warnings.warn(
                f"CUDA graph of the extraction forward failed ({type(e).__name__}: {str(e)[:200]}); embedding "
                "with eager launches",
                stacklevel=3,
            )
            return None
        return graph, static_in, static_out


def _inference_forward(model, device: torch.device, precision: str, compile_: bool, graph: bool = False):
    """(embed(x, flip), input dtype) for the chosen precision; fp16 runs a half copy of the model; ``graph`` (CUDA)
    replays each batch shape as a CUDA graph.

    Kept per model while its weights are unchanged, so repeated calls neither copy, compile nor capture again."""
    graph = graph and device.type == "cuda"
    if not (compile_ or graph) and (device.type != "cuda" or precision != "fp16"):
        return _make_inference_forward(model, device, precision, compile_, graph)  # nothing costly to keep
    key = (device.type, precision, compile_, graph)
    state = tuple(p._version for p in model.parameters())
    cached = _FORWARDS.setdefault(model, {}).get(key)
    if cached is not None and cached[0] == state:
        return cached[1]
    made = _make_inference_forward(model, device, precision, compile_, graph)
    _FORWARDS[model][key] = (state, made)
    return made


def _make_inference_forward(model, device: torch.device, precision: str, compile_: bool, graph: bool):
    if precision == "fp32":  # on the CPU the model's Linear layers run through oneDNN
        m, dtype, autocast = model, torch.float32, False
    elif precision == "fp16":  # weights cast once; the whole forward in half precision, no per-op casts
        m, dtype, autocast = copy.deepcopy(model).half(), torch.float16, False
    else:
        m, dtype, autocast = model, torch.float32, True
    fn = m.embed
    if compile_:
        fn = torch.compile(fn, dynamic=False)
    return _Embed(fn, autocast, graph), dtype


@torch.no_grad()
def embed_images(
    model,
    images: np.ndarray,
    device: torch.device,
    batch: int = 256,
    flip: bool = True,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "auto",
    compile_: bool = False,
    cuda_graph: bool = True,
    camids: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, D) L2-normalised features, row i for image i.

    On CUDA each batch is staged in pinned memory by a helper thread one batch ahead and copied without blocking,
    so the host prepares batch i+1 while the GPU embeds batch i; features stay on the GPU until one copy back at
    the end. ``precision`` (see ``resolve_precision``): on CUDA fp16 weights and activations (the default: fastest,
    and within 1e-5 of fp32 in cosine on an H200, where bf16 autocast was 6e-5; rows that overflow are redone in
    fp32); on the CPU fp32 (the default) or bf16 autocast. ``compile_``: torch.compile the forward; ``cuda_graph``
    (CUDA): each batch one graph replay. Both pad every batch to the same size, so they build once. ``camids``
    (N,): each image's camera, which a model with camera embeddings (SIE) needs (it then runs without the graph)
    and any other ignores.
    """
    precision = resolve_precision(precision, device)
    model.eval()
    cuda = device.type == "cuda"
    cams_all = None
    if model.uses_cameras:
        if camids is None:
            raise ConfigError("this model embeds each image's camera (SIE): the images' camera ids are needed")
        check_cameras(model.cfg, camids, "these images")
        cams_all = torch.as_tensor(np.asarray(camids, dtype=np.int64))
    graph = cuda_graph and cuda and cams_all is None
    embed, dtype = _inference_forward(model, device, precision, compile_, graph)
    out = []
    pad = compile_ or graph
    for i, chunk, n in _staged_batches(images, batch, pad, torch.Tensor.pin_memory if cuda else None):
        x = normalize_batch(chunk.to(device, non_blocking=True) if cuda else chunk, dtype)
        cams = None
        if cams_all is not None:
            cams = cams_all[i : i + n]
            cams = torch.cat([cams, cams.new_zeros(len(x) - n)]).to(device)  # padded rows: any camera
        out.append(embed(x, flip, cams)[:n].float())
        if on_batch:
            on_batch(min(i + batch, len(images)))
    if not out:
        return np.zeros((0, model.cfg.feature_dim), np.float32)
    feats = torch.cat(out)
    if precision == "fp16" and cuda:  # half precision overflowed somewhere (huge activations): redo those in fp32
        bad = (~torch.isfinite(feats).all(1)).nonzero()[:, 0].cpu().numpy()
        if len(bad):
            redo = None if camids is None else np.asarray(camids)[bad]
            feats[torch.from_numpy(bad).to(device)] = torch.from_numpy(
                embed_images(
                    model, images[bad], device, batch, flip, precision="fp32", cuda_graph=cuda_graph, camids=redo
                )
            ).to(device)
    return feats.cpu().numpy()


def _staged_batches(
    images: np.ndarray, batch: int, pad: bool, ahead: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """(start, uint8 batch, real rows) in order. ``pad``: the last batch zero-padded to ``batch`` rows (one static
    shape for a compiled forward). ``ahead`` (e.g. ``Tensor.pin_memory``): applied to each batch by a helper
    thread one batch ahead (torch's copies release the GIL), so the host's copy of batch i+1 overlaps the
    launches of batch i."""

    def stage(i: int) -> tuple[int, torch.Tensor, int]:
        chunk = torch.from_numpy(images[i : i + batch])
        n = len(chunk)
        if pad and n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - n, *chunk.shape[1:]))])
        return i, ahead(chunk) if ahead else chunk, n

    starts = range(0, len(images), batch)
    if ahead is None:
        yield from map(stage, starts)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="reid-stage") as pool:
        pending = pool.submit(stage, 0) if len(starts) else None
        for k in range(len(starts)):
            current = pending.result()
            pending = pool.submit(stage, starts[k + 1]) if k + 1 < len(starts) else None
            yield current


def embed_dataset(
    model,
    data: str | Path,
    splits: tuple[str, ...],
    device: torch.device,
    batch: int = 256,
    flip: bool = True,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "auto",
    compile_: bool = False,
    cuda_graph: bool = True,
    camera_offset: int = 0,
) -> dict[str, FeatureSplit]:
    """Every image of ``splits`` embedded; ``camera_offset``: added to the file's camera ids before a camera-
    embedding (SIE) model sees them (a file joined with ``--extra-data`` at training); the features file keeps the
    file's own ids."""
    with open_splits(data, splits) as (attrs, parts):  # images read batch by batch, one batch ahead
        size = tuple(attrs["image_size"])
        if tuple(model.cfg.image_size) != size:
            raise ConfigError(
                f"the dataset images are {size[0]}x{size[1]} but the model was trained on "
                f"{model.cfg.image_size[0]}x{model.cfg.image_size[1]}; prepare the data at that size"
            )
        for s, p in parts.items():  # before any image is embedded
            check_cameras(model.cfg, p.camids + camera_offset, f"{data}'s {s} split")
        return {
            s: FeatureSplit(
                embed_images(
                    model,
                    p.images,
                    device,
                    batch,
                    flip,
                    on_batch,
                    precision,
                    compile_,
                    cuda_graph,
                    p.camids + camera_offset,
                ),
                p.pids,
                p.camids,
                p.paths,
            )
            for s, p in parts.items()
        }


def extract_features(cfg: ExtractConfig, on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write the features HDF5 with provenance; return the number of rows per split."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, config, source = load_run_model(cfg.run, device)
    # a camera-embedding model trained on joined files learned this file's cameras shifted (0 for --data)
    offset = config.get("camera_offsets", {}).get(str(Path(cfg.data).resolve()), 0) if model.uses_cameras else 0
    feats = embed_dataset(
        model, cfg.data, cfg.splits, device, cfg.batch, cfg.flip, on_batch, cfg.precision, cfg.compile, cfg.cuda_graph,
        offset,
    )  # fmt: skip
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    feats = {s: FeatureSplit(f.feats.astype(dtype), f.pids, f.camids, f.paths) for s, f in feats.items()}
    provenance = {
        "model_config": config["model"],
        "checkpoint": str(source),
        "checkpoint_sha256": sha256_file(source),
        "dataset": str(config.get("dataset", "")),
        "dataset_file": str(cfg.data),
        "flip": int(cfg.flip),
        "resize": str(read_dataset(cfg.data, (), images=False)[0].get("resize", "bicubic")),  # for 'reid search'
        "precision": resolve_precision(cfg.precision, device),
        "run": str(RunFiles(cfg.run).root),
    }
    write_features(cfg.out, feats, provenance)
    return {s: len(f) for s, f in feats.items()}
