"""Every speed target of DESIGN.md on one GPU, beside the peer baseline (run through benchmarks/gpu.sh).

    python benchmarks/gpu_bench.py [--peer PEER.json] [--out DIR] [--smoke] [--no-compile]

``--smoke`` runs every section at toy sizes on whatever device there is (the CPU here), so the script is exercised
by the test suite and cannot rot between GPU sessions. Writes ``gpu_bench.json`` into ``--out`` (default $OUT)
and prints one table last: what, ours, peer, ratio, target.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reidcli.model.vit import ModelConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _bench_model(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(image_size=(64, 32), dim=64, depth=2, heads=4)
    return ModelConfig.from_preset("vit_base", image_size=(256, 128))


def _timed_steps(fn, warm: int, blocks: int = 3, per_block: int = 10) -> float:
    """Seconds per call: median over blocks of ``per_block`` calls with one sync each (as a training loop runs)."""
    for _ in range(warm):
        fn()
    _sync()
    times = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(per_block):
            fn()
        _sync()
        times.append((time.perf_counter() - t) / per_block)
    return sorted(times)[len(times) // 2]


def _bench_runner(
    model: ModelConfig,
    batch: int,
    images: torch.Tensor,
    graph: bool,
    compile_mode: str | None = None,
    loss: str = "ce+triplet",
    erase_fill: str = "grey",
    jitter: float = 0.0,
):
    """The trainer's own step runner (engine.train._StepRunner) over resident ``images``, P×K labels, fused SGD."""
    from reidcli.data.augment import AugmentConfig
    from reidcli.engine.train import TrainConfig, _build, _StepRunner
    from reidcli.losses.combined import LossConfig

    cfg = TrainConfig(
        data="",
        run_dir="",
        model=model,
        loss=LossConfig(spec=loss),
        augment=AugmentConfig(erase_fill=erase_fill, jitter=jitter),
        batch=batch,
        device=str(DEV),
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
        cuda_graph=graph,
    )
    torch.manual_seed(0)
    state = _build(cfg, 751, DEV)
    rows = torch.arange(len(images), device=DEV)
    cams = rows % model.sie_cameras if model.sie_cameras else None  # --sie: each image's camera
    return _StepRunner(state, cfg, DEV, images, rows // cfg.k % 751, cams)


def engine_step(
    pe: str,
    model: ModelConfig,
    batch: int,
    smoke: bool,
    compile_mode: str | None = None,
    graph: bool = False,
    loss: str = "ce+triplet",
    frozen: bool = False,
    erase_fill: str = "grey",
    jitter: float = 0.0,
) -> dict:
    """img/s of reidcli's own training step as the trainer runs it (engine.train._StepRunner): gather from the
    resident uint8 images, batched augmentation, forward, ce+triplet, backward, gradient norm, fused SGD."""
    from dataclasses import replace

    from reidcli.data.augment import AugmentConfig

    images = torch.randint(0, 256, (4 * batch, *model.image_size, 3), dtype=torch.uint8, device=DEV)
    runner = _bench_runner(replace(model, pe=pe), batch, images, graph, compile_mode, loss, erase_fill, jitter)
    if frozen:  # --freeze-epochs: the head alone learns
        runner.set_frozen(True)
    idx = [torch.arange(i * batch, (i + 1) * batch, device=DEV) for i in range(4)]
    r = torch.rand(4, batch, AugmentConfig(jitter=jitter).draws, device=DEV)
    calls = [0]

    def run():
        i = calls[0] % 4
        calls[0] += 1
        runner(idx[i], r[i], 0.008, 1.0)

    t0 = time.perf_counter()
    run()
    _sync()
    first_s = time.perf_counter() - t0
    sec = _timed_steps(run, warm=1 if smoke else (5 if compile_mode else 3), per_block=2 if smoke else 10)
    out = {
        "pe": pe,
        "batch": batch,
        "compile": compile_mode,
        "graph": graph,
        "graph_captured": runner.graph is not None,
        "train_img_s": batch / sec,
        "first_step_s": first_s,
        "loss_finite": bool(torch.isfinite(runner.sums.losses["ce"]).item()),
    }
    if DEV.type == "cuda" and pe != "none" and compile_mode is None and not graph:
        from benchmarks.model_speed import fused_only

        try:
            with fused_only(DEV, with_bias=pe in ("rpe", "both")):
                run()  # raises "No available kernel" if the fused path cannot take these inputs
            _sync()
            out["fused_sdpa"] = True
        except RuntimeError as e:
            out["fused_sdpa"] = f"NO: {str(e)[:200]}"
    return out


def profile_step(pe: str, smoke: bool, out_dir: Path, graph: bool, compiled: bool = False) -> None:
    """Kernel-time table of a few steps, for deciding what to optimise (profile_train_<pe>[_compiled][_graph].txt)."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    from reidcli.data.augment import AUGMENT_DRAWS

    model, b = _bench_model(smoke), 8 if smoke else 64
    images = torch.randint(0, 256, (b, *model.image_size, 3), dtype=torch.uint8, device=DEV)
    runner = _bench_runner(replace(model, pe=pe), b, images, graph, "default" if compiled else None)
    idx = torch.arange(b, device=DEV)
    r = torch.rand(b, AUGMENT_DRAWS, device=DEV)
    for _ in range(3):
        runner(idx, r, 0.008, 1.0)
    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            runner(idx, r, 0.008, 1.0)
        _sync()
    key = "cuda_time_total" if DEV.type == "cuda" else "cpu_time_total"
    name = f"profile_train_{pe}{'_compiled' if compiled else ''}{'_graph' if graph else ''}.txt"
    (out_dir / name).write_text(prof.key_averages().table(sort_by=key, row_limit=45) + "\n")


def graph_equivalence(smoke: bool, steps: int = 6) -> dict:
    """The whole-step CUDA graph trains like eager steps: same init, batches and (changing) learning rates, no
    DropPath; reports how far the two end points differ relative to how far training moved the weights."""
    from dataclasses import replace

    from reidcli.data.augment import AUGMENT_DRAWS

    model = replace(_bench_model(smoke), pe="both", drop_path=0.0)
    b = 8 if smoke else 64
    gen = torch.Generator(device=DEV).manual_seed(1)
    images = torch.randint(0, 256, (4 * b, *model.image_size, 3), dtype=torch.uint8, device=DEV, generator=gen)
    r = torch.rand(4, b, AUGMENT_DRAWS, device=DEV, generator=gen)
    ends, losses = {}, {}
    for graph in (False, True):
        runner = _bench_runner(model, b, images, graph)
        state = runner.state
        start = torch.cat([p.detach().float().flatten() for p in state.model.parameters()])
        for i in range(steps):
            runner(torch.arange(i % 4 * b, (i % 4 + 1) * b, device=DEV), r[i % 4], 0.01 * (i + 1) / steps, i / steps)
        _sync()
        ends[graph] = torch.cat([p.detach().float().flatten() for p in state.model.parameters()])
        losses[graph] = {k: float(v) / steps for k, v in runner.sums.losses.items()}
        captured = runner.graph is not None
    moved = float((ends[False] - start).norm())
    return {
        "graph_captured": captured,
        "weights moved (eager)": moved,
        "graph-eager distance / moved": float((ends[True] - ends[False]).norm()) / max(moved, 1e-30),
        "losses eager": losses[False],
        "losses graph": losses[True],
    }


def train_steps(smoke: bool, out_dir: Path) -> dict:
    """The trainer's step for every --pe at batch 64 (and 256), eager and as one CUDA graph, then a profile."""
    from dataclasses import replace

    out = {}
    cfg = _bench_model(smoke)
    b = 8 if smoke else 64
    for pe in ("none", "ape", "sincos", "rpe", "both"):
        out[f"train {pe} b{b}"] = engine_step(pe, cfg, b, smoke)
    for pe in ("ape", "both"):
        out[f"train {pe} b{4 * b}"] = engine_step(pe, cfg, 4 * b, smoke)
    for pe in ("none", "ape", "rpe", "both"):
        try:
            out[f"train {pe} b64 graph"] = engine_step(pe, cfg, b, smoke, graph=True)
        except Exception as e:  # noqa: BLE001
            out[f"train {pe} b64 graph"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    # TransReID's modules: JPM (a fifth of a block's tokens ×4 groups through a copy of the last block, each group
    # with its own bias) eager with the fused-kernel check, and JPM + SIE as one CUDA graph
    out["train both b64 jpm"] = engine_step("both", replace(cfg, jpm=True), b, smoke)
    try:
        out["train both b64 graph sie+jpm"] = engine_step(
            "both", replace(cfg, jpm=True, sie_cameras=6), b, smoke, graph=True
        )
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph sie+jpm"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:  # a cosine ID head with its margin (fast-reid's CircleSoftmax) inside the captured step
        out["train both b64 graph circle"] = engine_step("both", replace(cfg, id_head="circle"), b, smoke, graph=True)
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph circle"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:  # the center loss: its centres' own SGD step inside the captured step
        out["train both b64 graph center"] = engine_step("both", cfg, b, smoke, graph=True, loss="ce+triplet+center")
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph center"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:  # --freeze-epochs: the backbone frozen (no weight gradients but the head's) inside the captured step
        out["train both b64 graph frozen"] = engine_step("both", cfg, b, smoke, graph=True, frozen=True)
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph frozen"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:  # --erase-fill noise: a (B, 3, H, W) normal draw from the device generator inside the captured step
        out["train both b64 graph noise-erasing"] = engine_step("both", cfg, b, smoke, graph=True, erase_fill="noise")
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph noise-erasing"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:  # --jitter-prob 0.5: the colour jitter's 16 whole-batch operations (static shapes) inside the captured step
        out["train both b64 graph colour-jitter"] = engine_step("both", cfg, b, smoke, graph=True, jitter=0.5)
    except Exception as e:  # noqa: BLE001
        out["train both b64 graph colour-jitter"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if DEV.type == "cuda":  # the biased attention through cuDNN instead of the memory-efficient kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out["train both b64 graph cudnn-attention"] = engine_step("both", cfg, b, smoke, graph=True)
        except Exception as e:  # noqa: BLE001
            out["train both b64 graph cudnn-attention"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        out["graph equivalence"] = graph_equivalence(smoke)
    except Exception as e:  # noqa: BLE001
        out["graph equivalence"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for graph in (False, True):
        try:
            profile_step("both", smoke, out_dir, graph)
        except Exception as e:  # noqa: BLE001 — the profile is an aid, never a reason to lose the numbers
            out[f"profile error graph={graph}"] = repr(e)[:300]
    return out


def compiled_steps(smoke: bool, modes: tuple[str, ...], out_dir: Path | None = None) -> dict:
    """torch.compile'd steps, inside the whole-step CUDA graph ("graph") or with torch's own CUDA graphs
    ("reduce-overhead"): slow to build, so run late and a timeout loses only these."""
    cfg = _bench_model(smoke)
    out = {}
    in_graph = {"graph": "default", "autotune-graph": "max-autotune-no-cudagraphs"}  # compiled inside our graph
    for mode in modes:
        for pe in ("ape", "both"):
            graph = mode in in_graph
            key = f"train {pe} b64 compiled" + (f"+{mode}" if graph else f" {mode}")
            try:
                out[key] = engine_step(pe, cfg, 8 if smoke else 64, smoke, in_graph.get(mode, mode), graph)
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if "graph" in modes and out_dir is not None:
        try:
            profile_step("ape", smoke, out_dir, graph=True, compiled=True)
        except Exception as e:  # noqa: BLE001
            out["profile error compiled"] = repr(e)[:300]
    return out


def _market_like_dataset(path: Path, n_train: int, n_ids: int, size: tuple[int, int]) -> None:
    """A dataset HDF5 of Market's size: synthetic pedestrians drawn once per identity-camera, tiled."""
    from reidcli.data.store import write_dataset
    from reidcli.data.synthetic import SyntheticConfig, _camera_style, draw_person, make_identity

    cfg = SyntheticConfig()
    rng = np.random.default_rng(0)
    pids = np.sort(np.arange(n_train) % n_ids) + 1
    cams = rng.integers(0, 6, n_train)
    base = {}
    with write_dataset(path, "synthetic-market-size", size) as w:
        for split, n in (("train", n_train), ("query", 64), ("gallery", 256)):
            p, c = (pids[:n], cams[:n]) if split == "train" else (np.arange(n) % 16 + 1, np.arange(n) % 6)
            images = w.add_split(split, p, c, [f"{split}/{i}.jpg" for i in range(n)])
            block = []
            for i in range(n):
                key = (int(p[i]), int(c[i]))
                if key not in base:
                    style = _camera_style(0, key[1], cfg.difficulty)
                    arr = torch.from_numpy(draw_person(make_identity(0, key[0]), rng, style, cfg.difficulty).copy())
                    big = torch.nn.functional.interpolate(
                        arr.permute(2, 0, 1)[None].float(), size=size, mode="bilinear"
                    )
                    base[key] = big[0].permute(1, 2, 0).byte().numpy()
                block.append(base[key])
                if len(block) == 1024 or i == n - 1:
                    images[i + 1 - len(block) : i + 1] = np.stack(block)
                    block = []


def market_epoch(smoke: bool, tmp: Path, compile_mode: str | None = None, graph: bool = False) -> dict:
    """Epochs of ViT-B/16 `both` training from a dataset HDF5 of 12,936 images: data path included."""
    from reidcli.engine.train import TrainConfig, train

    n, ids, size = (256, 32, (64, 32)) if smoke else (12936, 751, (256, 128))
    data = tmp / "market_size.h5"
    t = time.perf_counter()
    if not data.exists():
        _market_like_dataset(data, n, ids, size)
    build_s = time.perf_counter() - t
    model = (
        ModelConfig(pe="both", image_size=size, dim=64, depth=2, heads=4)
        if smoke
        else ModelConfig.from_preset("vit_base", pe="both", image_size=size)
    )
    cfg = TrainConfig(
        data=str(data),
        run_dir=str(tmp / f"epoch_run_{compile_mode}_{graph}"),
        model=model,
        epochs=2,
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
        cuda_graph=graph,
        batch=64,
        k=4,
        device=str(DEV),
        warmup_epochs=1,
    )
    t = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t
    rows = result.metrics
    return {
        "compile": compile_mode,
        "graph": graph,
        "images": n,
        "dataset_build_s": build_s,
        "epoch1_s": rows[0]["seconds"],
        "epoch2_s": rows[1]["seconds"],
        "epoch2_img_s": rows[1]["images_per_s"],
        "two_epochs_wall_s_incl_load_and_save": wall,
        "losses": [{k: v for k, v in r.items() if k.startswith("loss") or k in ("lr", "grad_norm_max")} for r in rows],
    }


def extraction(smoke: bool, compile_: bool = True, out_dir: Path | None = None) -> dict:
    """Extraction img/s of 19,281 images (Market query + gallery) from host uint8 arrays to host features, per
    precision, eager and compiled; and each precision's feature fidelity against fp32 (1 − cosine)."""
    from reidcli.engine.extract import embed_images
    from reidcli.model.vit import ViTReID

    cfg = (
        ModelConfig(image_size=(64, 32), dim=64, depth=2, heads=4)
        if smoke
        else ModelConfig.from_preset("vit_base", image_size=(256, 128))
    )
    out = {}
    n = 512 if smoke else 19281
    images = np.random.default_rng(0).integers(0, 256, (n, *cfg.image_size, 3), dtype=np.uint8)
    # (precision, flip, compiled, CUDA graph): the graph is the default; one row without it, as run 2 measured
    variants = [("bf16", False, False, True), ("fp16", False, False, True), ("fp16", True, False, True)]
    variants += [("fp16", False, False, False)]
    if compile_:
        variants += [("fp16", False, True, True)]
    for pe in ("ape", "both"):
        torch.manual_seed(0)
        model = ViTReID(ModelConfig(**{**cfg.to_dict(), "pe": pe})).to(DEV)
        if pe == "both":  # non-zero relative tables, so the bias path is exercised with real values
            with torch.no_grad():
                for r in model.rel_pos:
                    r.relative_position_bias_table.normal_(0, 0.5)
        ref = embed_images(model, images[:1024], DEV, batch=512, flip=False, precision="fp32")
        for precision, flip, comp, graph in variants:
            key = f"extract {pe} {precision}{' flip' if flip else ''}{' compiled' if comp else ''}"
            key += "" if graph else " no-graph"
            kw = {"precision": precision, "compile_": comp, "cuda_graph": graph}
            try:
                feats = embed_images(model, images[:1024], DEV, 512, False, **kw)
                out[f"{key} 1-cos vs fp32 max"] = float((1 - (feats * ref).sum(1)).max())
                _sync()
                t = time.perf_counter()
                embed_images(model, images, DEV, batch=512, flip=flip, **kw)
                _sync()
                out[key] = n / (time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if pe == "ape":
            try:
                out.update(_streamed_extraction(model, images, smoke))
            except Exception as e:  # noqa: BLE001
                out["extract ape fp16 streamed from HDF5"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        try:
            out.update(_extraction_split(model, pe, smoke, out_dir))
        except Exception as e:  # noqa: BLE001
            out[f"extract {pe} split"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def _streamed_extraction(model, images: np.ndarray, smoke: bool) -> dict:
    """`reid extract`'s own path: the images read from a dataset HDF5 a batch at a time (one batch ahead, in the
    staging thread) against the same images from memory, fp16 with the CUDA graph (img/s, file in the page cache)."""
    from reidcli.data.store import write_dataset
    from reidcli.engine.extract import embed_dataset, embed_images

    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.h5"
        with write_dataset(path, "bench", model.cfg.image_size) as w:
            w.add_split("query", np.ones(n, np.int64), np.zeros(n, np.int64), [str(i) for i in range(n)])[:] = images
        rates = {}
        for label, run in (
            ("streamed from HDF5", lambda: embed_dataset(model, path, ("query",), DEV, 512, False, precision="fp16")),
            ("from memory", lambda: embed_images(model, images, DEV, 512, False, precision="fp16")),
        ):
            run()  # warm: graph capture, page cache
            _sync()
            t = time.perf_counter()
            run()
            _sync()
            rates[f"extract ape fp16 {label}"] = n / (time.perf_counter() - t)
    return rates


def _extraction_split(model, pe: str, smoke: bool, out_dir: Path | None) -> dict:
    """Where extraction's time goes: the fp16 forward alone on a batch already on the GPU (img/s), against the
    whole path; for ``ape``, a kernel table of four b512 batches through the whole path."""
    from reidcli.data.augment import normalize_batch
    from reidcli.engine.extract import _inference_forward, embed_images

    b = 64 if smoke else 512
    split = {}
    for graph in (False, True):
        embed, dtype = _inference_forward(model, DEV, "fp16", False, graph)
        x = normalize_batch(torch.randint(0, 256, (b, *model.cfg.image_size, 3), dtype=torch.uint8, device=DEV), dtype)
        with torch.no_grad():
            sec = _timed_steps(lambda: embed(x, False), 2, 3, 5)  # noqa: B023 (called before the next loop)
        split[f"extract {pe} fp16 model-only{' graph' if graph else ''}"] = b / sec
    if pe == "ape" and out_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        images = np.random.default_rng(1).integers(0, 256, (4 * b, *model.cfg.image_size, 3), dtype=np.uint8)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
        with profile(activities=acts) as prof:
            embed_images(model, images, DEV, batch=b, flip=False, precision="fp16", cuda_graph=False)  # kernels visible
            _sync()
        key = "cuda_time_total" if DEV.type == "cuda" else "cpu_time_total"
        (out_dir / "profile_extract_ape_fp16.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    return split


def _gemm_seconds(q: np.ndarray, g: np.ndarray, memory_mb: int, mode: str = "fp32") -> float:
    """The similarity products alone (``mode`` as reidcli.retrieval.similarity), chunked as the evaluation chunks
    them, the gallery's preparation included: the floor under the evaluation's time."""
    from reidcli.retrieval.similarity import Similarity, choose_mode

    qt, gt = torch.from_numpy(q).to(DEV), torch.from_numpy(g).to(DEV)
    chunk = max(1, (memory_mb << 20) // (40 * len(gt)))

    def run():
        scores = Similarity(gt, choose_mode(qt, gt, mode))
        return [scores(qt[i : i + chunk]) for i in range(0, len(qt), chunk)]

    return _timed_steps(run, 1, 3, 1)


def evaluation(smoke: bool, out_dir: Path) -> dict:
    from benchmarks.cpu_eval import TRAINED, market_like, with_distractors
    from reidcli.retrieval.evaluate import EvalConfig, evaluate
    from reidcli.retrieval.features import FeatureSplit

    # (queries, gallery with ids, identities, distractors): Market-1501 + 500k is Market's gallery plus 484,087
    # distractor images of no query's identity (random directions here), so a query keeps ~14 positives.
    sizes = {
        "market": (3368, 15913, 750, 0),
        "msmt17": (11659, 82161, 3060, 0),
        "market500k": (3368, 15913, 750, 500_000 - 15913),
    }
    if smoke:
        sizes = {k: (q // 50, g // 100, i // 20, d // 100) for k, (q, g, i, d) in sizes.items()}
    out = {}
    mem = 256 if smoke else 16384
    cfg = EvalConfig(engine="torch", device=str(DEV), memory_mb=mem)  # counting "auto": the Triton kernel on a GPU
    for name, (nq, ng, ids, distractors) in sizes.items():
        q, g = market_like(nq, ng, ids, seed=1, noise=TRAINED)
        g = with_distractors(g, distractors)
        t = time.perf_counter()
        evaluate(q, g, cfg)  # warm-up; the first call builds the kernel (Triton's disk cache keeps it afterwards)
        out[f"eval {name} first call s"] = time.perf_counter() - t
        runs = [evaluate(q, g, cfg) for _ in range(3)]
        out[f"eval {name} ms"] = 1e3 * min(r.seconds for r in runs)
        out[f"eval {name} gemm-only ms"] = 1e3 * _gemm_seconds(q.feats, g.feats, mem)
        out[f"eval {name} split-gemm-only ms"] = 1e3 * _gemm_seconds(q.feats, g.feats, mem, "split")
        out[f"eval {name} mAP"] = runs[0].metrics.mAP
        # one change at a time on the same GPU: the fp32 GEMM with the kernel, and run 2's way (fp32 GEMM, sort)
        for tag, kw in {
            "fp32-similarity": {"similarity": "fp32"},
            "sort": {"similarity": "fp32", "counting": "sort"},
        }.items():
            alt = EvalConfig(engine="torch", device=str(DEV), memory_mb=mem, **kw)
            evaluate(q, g, alt)
            alt_runs = [evaluate(q, g, alt) for _ in range(3)]
            out[f"eval {name} {tag} ms"] = 1e3 * min(r.seconds for r in alt_runs)
            out[f"eval {name} {tag} - default mAP"] = alt_runs[0].metrics.mAP - runs[0].metrics.mAP
        # features stored as float16 (`reid extract --dtype float16`): tensor-core products, exact as the upcast
        q16, g16 = (FeatureSplit(s.feats.astype(np.float16), s.pids, s.camids) for s in (q, g))
        evaluate(q16, g16, cfg)
        fp16 = [evaluate(q16, g16, cfg) for _ in range(3)]
        out[f"eval {name} fp16-features ms"] = 1e3 * min(r.seconds for r in fp16)
        # the same numbers from the CPU path (its own GEMM and the counting method): exact at every size
        for tag, (a, b, gpu) in {"": (q, g, runs[0].metrics), "fp16 ": (q16, g16, fp16[0].metrics)}.items():
            cpu = evaluate(a, b, EvalConfig(engine="torch", device="cpu")).metrics
            out[f"{name} {tag}gpu-cpu max metric diff"] = max(
                abs(gpu.mAP - cpu.mAP),
                abs(gpu.mINP - cpu.mINP),
                max(abs(x - y) for x, y in zip(gpu.cmc, cpu.cmc, strict=True)),
            )
        if name == "market":
            from torch.profiler import ProfilerActivity, profile

            from reidcli.retrieval import metrics

            # whether the Triton kernel ran, or failed once and left the counting to torch (with its error)
            kernel = metrics._KERNEL_FAILED[0] if metrics._KERNEL_FAILED else "used"
            out["eval ranking kernel"] = kernel if DEV.type == "cuda" else "not on the CPU: torch methods"

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
            with profile(activities=acts) as prof:
                evaluate(q, g, cfg)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (out_dir / "profile_eval_market.txt").write_text(table + "\n")
            rr = EvalConfig(engine="torch", device=str(DEV), rerank=True, memory_mb=mem)
            evaluate(q, g, rr)
            out["rerank market s"] = min(evaluate(q, g, rr).seconds for _ in range(2))
            aqe = EvalConfig(engine="torch", device=str(DEV), aqe=True, memory_mb=mem)
            evaluate(q, g, aqe)
            aqe_runs = [evaluate(q, g, aqe) for _ in range(2)]
            out["aqe market ms"] = 1e3 * min(r.seconds for r in aqe_runs)
            out["aqe market gpu-cpu mAP diff"] = abs(
                aqe_runs[0].metrics.mAP - evaluate(q, g, EvalConfig(engine="torch", device="cpu", aqe=True)).metrics.mAP
            )
            roc = EvalConfig(engine="torch", device=str(DEV), roc=(1e-4, 1e-3, 1e-2), memory_mb=mem)
            evaluate(q, g, roc)
            roc_runs = [evaluate(q, g, roc) for _ in range(2)]
            out["roc market ms"] = 1e3 * min(r.roc_seconds for r in roc_runs)
            cpu_roc = evaluate(q, g, EvalConfig(engine="torch", device="cpu", roc=roc.roc)).roc
            out["roc market gpu-cpu max TPR diff"] = max(
                abs(a - b) for a, b in zip(roc_runs[0].roc.tpr, cpu_roc.tpr, strict=True)
            )
    return out


def _host_speed() -> dict:
    """How fast this host issues work: µs per launch of a tiny kernel (the pace of any eager loop of small
    operations), and GB/s of one 50 MB copy into pinned memory (extraction's staging of a b512 batch)."""
    x = torch.zeros(16, device=DEV)
    for _ in range(100):
        x.add_(1)
    _sync()
    t = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    launch = (time.perf_counter() - t) / 2000
    _sync()
    out = {"launch us": 1e6 * launch}
    if DEV.type == "cuda":
        src = torch.empty(50 << 20, dtype=torch.uint8)
        src.pin_memory()  # the caching host allocator keeps the block for the timed copy
        t = time.perf_counter()
        src.pin_memory()
        out["pin GB/s"] = (50 << 20) / (time.perf_counter() - t) / 1e9
    return out


def peer_for(key: str) -> tuple[str | None, bool, float | None]:
    """Our row → (the peer_baseline.py row it is compared with, higher is better, DESIGN.md target)."""
    rel = " rpe " in f" {key} " or " both " in f" {key} "
    model = "vit_relpos_base_patch16_224" if rel else "vit_base_patch16_224"
    if key.startswith("train ") and not key.endswith(("s", "error")):
        batch = "b256" if " b256" in key else "b64"
        compiled = "compiled" in key and not rel and batch == "b64"  # the peer compiles only vit_base at b64
        peer = f"train {model} 256x128 {batch} bf16 {'compiled' if compiled else 'eager'}"
        target = (4500 if rel else 5000) if batch == "b64" and "jpm" not in key else None  # DESIGN.md's: plain ViTs
        return peer, True, target
    if key.startswith("extract ") and "cos" not in key and "flip" not in key:
        return f"infer {model} 256x128 b512 bf16 eager", True, 20000
    if key.startswith("market epoch s"):
        return None, False, 3
    sizes = {"market": "3368x15913", "msmt17": "11659x82161", "market500k": "3368x500000"}
    targets = {"market": 3, "msmt17": 50, "market500k": 80}
    for name, size in sizes.items():
        if key.startswith(f"eval {name} ") and key.endswith(" ms") and "gemm" not in key:
            return f"exact sim+full sort {size} d768 fp32", False, targets[name]
    if key == "rerank market s":
        return None, False, 1
    return None, True, None


def table(flat: dict, peer: dict) -> list[tuple]:
    rows = []
    for key, value in flat.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        peer_key, higher, target = peer_for(key)
        p = peer.get(peer_key) if peer_key else None
        ratio = (value / p if higher else p / value) if p and value else None
        rows.append((key, value, p, ratio, target))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", help="peer_baseline.py's JSON (anchor_gpu.json)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    # also: autotune-graph (max-autotune GEMM templates inside our graph: minutes to build, a second call),
    # reduce-overhead (torch's own CUDA graphs), default (compiled, no graph)
    ap.add_argument("--compile-modes", default="graph")
    ap.add_argument("--sections", default="eval,train,epoch,extract,compile,epochc")
    args = ap.parse_args()
    sections = args.sections.split(",")
    modes = tuple(args.compile_modes.split(","))
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "host": _host_speed()}
    flat: dict = {}
    peer = json.loads(Path(args.peer).read_text()) if args.peer and Path(args.peer).is_file() else {}
    result["peer"] = peer
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            "eval": lambda: evaluation(args.smoke, out_dir),
            "extract": lambda: extraction(args.smoke, not args.no_compile, out_dir),
            "train": lambda: train_steps(args.smoke, out_dir),
            "epoch": lambda: {"graph": market_epoch(args.smoke, Path(tmp), graph=True)},
            "compile": lambda: {} if args.no_compile else compiled_steps(args.smoke, modes, out_dir),
            "epochc": lambda: {} if args.no_compile else market_epoch(args.smoke, Path(tmp), "default", True),
        }
        for section in sections:  # quick, central sections first; JSON rewritten after each one
            t = time.perf_counter()
            try:
                result[section] = steps[section]()
            except Exception as e:  # noqa: BLE001 — one failing section must not lose the others' numbers
                result[section] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{section}] {time.perf_counter() - t:.1f}s", flush=True)
            if section == "epoch" and "error" not in result[section]:
                for variant, r in result[section].items():
                    flat[f"market epoch s {variant}"] = r["epoch2_s"]
            elif section == "epochc" and "epoch2_s" in result[section]:
                flat["market epoch s compiled+graph"] = result[section]["epoch2_s"]
            else:
                for k, v in result[section].items():
                    flat[k] = v["train_img_s"] if isinstance(v, dict) and "train_img_s" in v else v
            (out_dir / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{'what':44s} {'ours':>12s} {'peer':>12s} {'ratio':>7s} {'target':>8s}   ({name})")
    for key, value, p, ratio, target in table(flat, peer):
        print(
            f"{key:44s} {value:12.3f} {p if p is not None else float('nan'):12.3f} "
            f"{ratio if ratio is not None else float('nan'):7.2f} {target if target else '':>8}"
        )


if __name__ == "__main__":
    main()
