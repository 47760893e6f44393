"""oneDNN for the CPU's float32 products: 1.6–1.9× MKL's ``torch.mm`` on 2 AMD EPYC cores (325 against 171 GFLOP/s
in Market-size similarity blocks; ViT forward 1.6–1.9×, training step 1.3–1.4×).

torch routes a float32 ``nn.Linear`` / ``torch.mm`` on the CPU to MKL; oneDNN's linear operator
(``torch.ops.mkldnn._linear_pointwise``, the one torch's compiler emits for CPU linear layers) takes plain tensors and
runs on torch's own thread pool. :func:`cpu_gemm_way` checks once per process that it runs and agrees with
``torch.mm``; everything here falls back to torch's own products where it does not.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["cpu_gemm_way", "linear", "linear_gelu", "Linear"]

_ERRORS = (RuntimeError, AttributeError, NotImplementedError, TypeError)


def _probe(fn):
    """A once-per-process check (``functools.cache``), run outside autocast: its first call may come from inside
    the CPU's bf16 autocast, which would turn the float32 reference products into bf16 ones."""

    @functools.cache
    @functools.wraps(fn)
    def checked(*args):
        with torch.autocast("cpu", enabled=False):
            return fn(*args)

    return checked


@_probe
def cpu_gemm_way() -> str:
    """How the CPU multiplies float32 matrices, the first of these that runs here and matches ``torch.mm``:

    - "onednn": oneDNN's linear operator on plain tensors: operands as they are, the product written straight into
      a plain tensor;
    - "mkldnn": the public ``mkldnn`` layout (``F.linear`` on ``to_mkldnn()`` tensors): a copy of the right-hand
      operand, and each product copied back (+20% at MSMT17 size);
    - "mm": MKL's ``torch.mm`` (a torch without oneDNN).
    """
    a = torch.linspace(-1.0, 1.0, 8 * 16).view(8, 16)
    b = torch.linspace(2.0, -2.0, 24 * 16).view(24, 16).sin()
    ways = {
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [None], ""),
        "mkldnn": lambda: F.linear(a.to_mkldnn(), b.to_mkldnn()).to_dense(),
    }
    return next((way for way, product in ways.items() if _agrees(product, a @ b.T)), "mm")


def _agrees(product, ref: torch.Tensor, rtol: float = 0.0, atol: float = 1e-5) -> bool:
    """Whether ``product()`` runs here and gives a plain tensor equal to the float32 ``ref`` (float32 rounding
    apart, or the tolerances given)."""
    try:
        got = product()
    except _ERRORS:
        return False
    return got.layout == torch.strided and torch.allclose(got.float(), ref, rtol=rtol, atol=atol)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` by oneDNN's operator (no autograd): contiguous float32 CPU tensors, "onednn" way."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [None], "")


@_probe
def _gelu_post_op_ok(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's exact (erf) GELU post-op runs here on ``dtype`` operands and gives ``F.gelu`` of the product
    (to float32 rounding; bf16: to bf16 rounding of the output)."""
    if cpu_gemm_way() != "onednn":
        return False
    a = torch.linspace(-3.0, 3.0, 8 * 16).view(8, 16).to(dtype)
    b = torch.linspace(2.0, -2.0, 24 * 16).view(24, 16).sin().to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    fused = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "gelu", [None], "none")  # noqa: E731
    return _agrees(fused, F.gelu(a.float() @ b.float().T), rtol=tol, atol=tol)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` (exact GELU), no autograd: one oneDNN operator for CPU tensors, the GELU applied
    while each output tile is still in cache (ViT-S/B MLP: the separate GELU pass was 12% of an fp32 CPU forward; in
    bf16 it is slower still). float32, or under the CPU's bf16 autocast on bf16 operands cast here as autocast would
    cast them; ``F.gelu(F.linear(...))`` anywhere else."""
    op = torch.ops.mkldnn._linear_pointwise
    if _applies(x, weight) and _gelu_post_op_ok():
        return op(x.contiguous(), weight.contiguous(), bias, "gelu", [None], "none")
    if _cpu_bf16_autocast(x) and _gelu_post_op_ok(torch.bfloat16):

        def bf16(t):
            return None if t is None else t.to(torch.bfloat16).contiguous()

        return op(bf16(x), bf16(weight), bf16(bias), "gelu", [None], "none")
    return F.gelu(F.linear(x, weight, bias))


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or not _autocast_on() or _compiling():
        return False
    try:
        dtype = torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # torch < 2.4
        dtype = torch.get_autocast_cpu_dtype()
    return dtype == torch.bfloat16 and cpu_gemm_way() == "onednn"


def _compiling() -> bool:
    return getattr(torch.compiler, "is_compiling", lambda: False)()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if _compiling() or _autocast_on():
        return False
    return cpu_gemm_way() == "onednn"


@_probe
def _transposed_operands_ok() -> bool:
    """Whether oneDNN's operator takes transposed (column-major) operands in place and agrees with ``torch.mm``:
    then the weight gradient ``gradᵀ·x`` runs there without copies (1.2–1.9× MKL's ``torch.mm`` on the test machine's
    AMD cores for ViT-Tiny/Small shapes; copying the operands first had cost most of that gain)."""
    if cpu_gemm_way() != "onednn":
        return False
    a = torch.linspace(-1.0, 1.0, 37 * 24).view(37, 24).cos()
    b = torch.linspace(2.0, -2.0, 37 * 16).view(37, 16).sin()
    return _agrees(lambda: torch.ops.mkldnn._linear_pointwise(a.t(), b.t(), None, "none", [None], ""), a.t() @ b)


def _weight_grad(grad2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``grad2ᵀ @ x2`` for (tokens, out) and (tokens, in) float32 CPU tensors. oneDNN's operator runs fastest with
    the wider side as its output columns: a layer that widens (out > in: qkv, fc1) gets ``(x2ᵀ @ grad2)ᵀ`` and one
    transposed copy (1.2–1.6× for ViT-Tiny/Small shapes on the test machine's cores, the copy included)."""
    op = torch.ops.mkldnn._linear_pointwise
    if not _transposed_operands_ok():
        return grad2.t() @ x2
    if grad2.shape[1] > x2.shape[1]:
        return op(x2.t(), grad2.t(), None, "none", [None], "").t().contiguous()
    return op(grad2.t(), x2.t(), None, "none", [None], "")


class _LinearFn(torch.autograd.Function):
    """oneDNN's forward, input gradient and (where it takes transposed operands) weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear(grad, weight.t())
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class Linear(torch.nn.Linear):
    """``nn.Linear`` whose float32 CPU products run through oneDNN (with gradients); anything else (a GPU, other
    dtypes, autocast, torch.compile tracing) is ``F.linear`` as before. Same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _applies(x, self.weight):
            return _LinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
