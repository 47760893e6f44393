"""Cosine scores, query rows against a fixed gallery, in float32 — on a GPU by tensor cores, as accurate as fp32.

Three ways, all giving float32 scores whose error is that of an fp32 GEMM (rounding in the accumulation):

- ``"fp32"``: one float32 GEMM (the CPU's way; on a GPU it runs on the CUDA cores, not the tensor cores). On the
  CPU by oneDNN, which reached 1.9× MKL's ``torch.mm`` in Market-size blocks on 2 AMD EPYC cores (325 against
  171 GFLOP/s): see :func:`cpu_gemm_way`.
- ``"fp16"``: features stored as float16: one tensor-core GEMM with float32 accumulation and output. Every
  fp16 × fp16 product is exact in fp32, so this is the arithmetic of upcasting first.
- ``"split"``: float32 features on a GPU. Each value is split as ``x = hi + lo·2⁻¹¹`` with ``hi`` and ``lo`` float16
  (22 significant bits of ``x``; ``lo`` is scaled up by 2¹¹ so that it does not fall into fp16's subnormal range),
  and ``x·y ≈ hi·hi' + 2⁻¹¹ (hi·lo' + lo·hi')``: two tensor-core GEMMs with float32 accumulation, the second over
  the concatenated pieces. What is left out (``lo·lo'·2⁻²²`` and the bits beyond 22) is at most ~2⁻²¹ Σ|xᵢyᵢ|,
  below an fp32 GEMM's own accumulation error, at a fraction of its time (the error-compensated split of Ootomo
  and Yokota, 2022). Used for features of norm ≤ 1 (the file format stores them L2-normalised), where fp16
  cannot overflow.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from reidcli.onednn import cpu_gemm_way, linear

__all__ = ["MODES", "CpuGemm", "Similarity", "choose_mode", "cpu_gemm_way", "similarity", "matmul_t"]

MODES = ("auto", "fp32", "fp16", "split")
_SCALE = 2048.0  # 2¹¹: lo's scale, the fp16 significand width


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T of float16 operands, accumulated and returned in float32."""
    if a.is_cuda:
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return a.float() @ b.float().T  # the CPU has no fp16 → fp32 product: the same products, upcast first


@functools.cache
def _half_products_available(device: str) -> bool:
    """Whether torch can multiply float16 into float32 on this device (``torch.mm(..., out_dtype=)``)."""
    try:
        x = torch.ones((2, 2), dtype=torch.float16, device=device)
        return bool(torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32)
    except (RuntimeError, TypeError):
        return False


def _tensor_cores(x: torch.Tensor) -> bool:
    return x.is_cuda and _half_products_available(str(x.device))


def choose_mode(query: torch.Tensor, gallery: torch.Tensor, requested: str = "auto") -> str:
    """The mode for these feature tensors: "fp16" when both are float16 on a GPU that multiplies them into float32,
    "split" for float32 features of norm ≤ 1 there, else "fp32". A requested mode other than "auto" is kept when
    it can run (float16 and split need a GPU's fp16 → fp32 products), else "fp32"."""
    if requested == "fp32" or not _tensor_cores(query):
        return "fp32"
    if query.dtype == gallery.dtype == torch.float16:
        return "fp16"
    if requested == "split":
        return "split"
    if not (query.numel() and gallery.numel()):
        return "fp32"
    inf = float("inf")  # largest |component|: three launches and one sync
    peak = torch.maximum(torch.linalg.vector_norm(query, inf), torch.linalg.vector_norm(gallery, inf))
    return "split" if float(peak) <= 1.0 else "fp32"


class CpuGemm:
    """``CpuGemm(gallery)(rows)`` → ``rows @ gallery.T`` in float32 on the CPU, the way :func:`cpu_gemm_way` picked;
    the gallery prepared once."""

    def __init__(self, gallery: torch.Tensor):
        self.g = gallery.float().contiguous()
        self.way = cpu_gemm_way() if self.g.numel() else "mm"
        self.g_mkldnn = self.g.to_mkldnn() if self.way == "mkldnn" else None

    @property
    def takes_out(self) -> bool:
        """Whether a call writes into its ``out`` buffer (only torch.mm does; oneDNN returns a new tensor)."""
        return self.way == "mm"

    def __call__(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = rows.float().contiguous()
        if self.way == "mm" or not len(rows):
            return torch.mm(rows, self.g.T, out=out)
        if self.way == "onednn":
            return linear(rows, self.g)
        return F.linear(rows.to_mkldnn(), self.g_mkldnn).to_dense()


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in float32; on the CPU by :class:`CpuGemm`."""
    return a.float() @ b.float().T if a.is_cuda else CpuGemm(b)(a)


class Similarity:
    """``Similarity(gallery, mode)(query_rows)`` → (Q, G) float32 scores; the gallery is prepared once."""

    def __init__(self, gallery: torch.Tensor, mode: str = "fp32", mm=_mm32):
        if mode not in MODES[1:]:
            raise ValueError(f"unknown similarity mode {mode!r}")
        self.mode, self.mm = mode, mm
        self.cpu = None
        if mode == "split":
            hi, lo = self.split(gallery)
            self.g_hi, self.g_cross = hi, torch.cat([lo, hi], dim=1)  # pairs with [hi | lo] of the queries
        elif mode == "fp16":
            self.g = gallery.half()
        elif gallery.is_cuda:
            self.g = gallery.float()
        else:
            self.cpu = CpuGemm(gallery)
        self.takes_out = mode == "fp32" and (self.cpu is None or self.cpu.takes_out)  # __call__ writes into ``out``

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 → (hi, lo) float16 with x ≈ hi + lo / 2¹¹ to 22 significant bits."""
        x = x.float()
        hi = x.half()
        return hi, ((x - hi.float()) * _SCALE).half()

    def __call__(self, query: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a float32 (Q, G) buffer for ``torch.mm``'s fp32 product (reused, it spares the allocator's fresh
        pages); oneDNN returns a new tensor."""
        if self.mode == "fp32":
            return torch.mm(query.float(), self.g.T, out=out) if self.cpu is None else self.cpu(query, out)
        if self.mode == "fp16":
            return self.mm(query.half(), self.g)
        hi, lo = self.split(query)
        scores = self.mm(hi, self.g_hi)
        return scores.add_(self.mm(torch.cat([hi, lo], dim=1), self.g_cross), alpha=1.0 / _SCALE)


def similarity(query: torch.Tensor, gallery: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """(Q, G) float32 cosine scores, the mode chosen as :func:`choose_mode` does."""
    return Similarity(gallery, choose_mode(query, gallery, mode))(query)
