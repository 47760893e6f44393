"""Training-step and inference images/s per positional encoding, on CPU or GPU.

    python benchmarks/model_speed.py [--preset vit_base] [--batch 64] [--image-size 256x128] [--compile]
        [--precision auto,bf16,fp32] [--out benchmarks/results/model_speed_<device>.json]

``--precision`` as ``reid train``'s (auto: bf16 autocast on CUDA, fp32 on the CPU); several, comma-separated, are
measured in turn for each --pe. On CUDA the step runs under bf16 autocast by default, and for ``rpe``/``both``
(and ``ape``) it is also run with SDPA restricted to the fused kernels: if the bias did not reach the
memory-efficient kernel, that run raises instead of silently taking the math path. Defaults on CPU are small
(vit_tiny, batch 16) so the script finishes in a minute.

Each row also times the step and the inference with the last block run for every token (``*_every_token_img_s``):
reidcli runs it for the CLS token alone where nothing reads the patch tokens (a CLS-only loss; every test feature).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from reidcli.model.vit import PE_CHOICES, ModelConfig, ViTReID


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(fn, dev, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def fused_only(dev: torch.device, with_bias: bool):
    """SDPA limited to fused kernels (memory-efficient when a bias is passed); None on CPU."""
    if dev.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = (
        [SDPBackend.EFFICIENT_ATTENTION] if with_bias else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    )
    return sdpa_kernel(backends)


def measure(
    pe: str, cfg: ModelConfig, batch: int, dev: torch.device, compile_: bool, steps: int, precision: str = "auto"
) -> dict:
    from reidcli.engine.train import train_precision

    model = ViTReID(ModelConfig(**{**cfg.to_dict(), "pe": pe, "num_classes": 751})).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.008, momentum=0.9)
    x = torch.randn(batch, 3, *cfg.image_size, device=dev)
    y = torch.randint(0, 751, (batch,), device=dev)
    fwd = torch.compile(model) if compile_ else model
    precision = train_precision(precision, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(patches: bool = False):
        # patches=False as reid train runs a loss on the CLS feature alone (ce, triplet): the last block for the CLS
        # token only; True: for every token (the patch-token losses, and peers' models)
        with autocast:
            loss = torch.nn.functional.cross_entropy(fwd(x, patches=patches).logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(every_token: bool = False):
        with autocast:
            model.eval()
            model.forward_features(x) if every_token else model._test_feature(x)  # the latter: reid extract's
            model.train()

    out = {
        "pe": pe,
        "batch": batch,
        "compile": compile_,
        "precision": precision,
        "train_img_s": batch / _timeit(step, dev, warm=5 if compile_ else 2, reps=steps),
        "infer_img_s": batch / _timeit(infer, dev, warm=2, reps=steps),
        # the same with the last block run for every token (as before the CLS-only last block; as timm's forward)
        "train_every_token_img_s": batch / _timeit(lambda: step(True), dev, warm=2, reps=steps),
        "infer_every_token_img_s": batch / _timeit(lambda: infer(True), dev, warm=2, reps=steps),
    }
    if dev.type == "cuda" and pe != "none" and not compile_:
        with fused_only(dev, with_bias=pe in ("rpe", "both")):
            step()  # raises "No available kernel" if the fused path cannot take these inputs
        out["fused_sdpa"] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--image-size", default="256x128")
    ap.add_argument("--pe", default=",".join(PE_CHOICES))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("vit_base" if dev.type == "cuda" else "vit_tiny")
    batch = args.batch or (64 if dev.type == "cuda" else 16)
    h, w = (int(v) for v in args.image_size.split("x"))
    cfg = ModelConfig.from_preset(preset, image_size=(h, w))
    rows = [
        measure(pe, cfg, batch, dev, args.compile, args.steps, precision)
        for pe in args.pe.split(",")
        for precision in args.precision.split(",")
    ]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "torch": torch.__version__, "preset": preset, "image_size": [h, w], "rows": rows}
    for r in rows:
        print(
            f"{r['pe']:7s} {r['precision']:5s} train {r['train_img_s']:9.1f} img/s  infer {r['infer_img_s']:9.1f} img/s"
            f"   (last block for every token: train {r['train_every_token_img_s']:.1f}, "
            f"infer {r['infer_every_token_img_s']:.1f})"
        )
    out = Path(args.out or f"benchmarks/results/model_speed_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
