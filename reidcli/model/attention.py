"""Multi-head self-attention with an optional additive bias, through PyTorch's fused SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import Mlp as TimmMlp
from torch import nn

from reidcli.onednn import Linear, linear_gelu

__all__ = ["Attention", "Block", "Mlp"]


def _exporting() -> bool:
    return getattr(torch.compiler, "is_exporting", lambda: False)()


class Attention(nn.Module):
    """Parameter names match timm's ViT (``qkv``, ``proj``) so its weights load unchanged."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)  # nn.Linear, through oneDNN on the CPU
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """x: (B, N, D); bias: (heads, N, N), or (B, heads, N, N) per sample, added to the scaled logits ``QKᵀ/√d``.

        ``cls_only``: the output of the first token (CLS) alone, (B, 1, D): its query against every key and value
        (the bias's first row), the other tokens' attention rows and projections never computed."""
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        if cls_only:
            q, n = q[:, :, :1], 1
            bias = None if bias is None else bias[..., :1, :]
        if bias is not None:
            # Same dtype as q and contiguous, or CUDA silently drops to the slow math kernel.
            bias = bias.to(q.dtype)
            bias = (bias.unsqueeze(0) if bias.dim() == 3 else bias).contiguous()
        if _exporting():  # the same formula in plain products: torch.export's decomposition of SDPA's CPU kernel
            # changes its output's strides, and the reshape below then fails (ONNX export)
            x = _softmax(q, k, bias) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
            )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))

    def weights(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, heads, N, N) attention weights ``softmax(QKᵀ/√d + B)`` of this layer for its input ``x`` (pictures:
        the forward itself never forms them)."""
        q, k, _ = self._qkv(x)
        return _softmax(q, k, bias)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(3, B, heads, N, head dim): queries, keys and values."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)


def _softmax(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (logits if bias is None else logits + bias).softmax(-1)


class Mlp(TimmMlp):
    """timm's Mlp (same parameter names) on oneDNN Linear layers; without gradients (extraction, evaluation) ``fc1``
    and its exact GELU run as one oneDNN operator on the CPU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden, act_layer=nn.GELU)
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.act.approximate != "none":
            return super().forward(x)
        x = self.drop1(linear_gelu(x, self.fc1.weight, self.fc1.bias))
        return self.drop2(self.fc2(self.norm(x)))


class Block(nn.Module):
    """Pre-norm transformer block on timm's Mlp and DropPath."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """(B, N, D) → (B, N, D); ``cls_only``: → (B, 1, D), the first token's output alone (the last block of a model
        whose loss and feature read only the CLS token: the other tokens' attention rows and MLP are skipped)."""
        attn = self.attn(self.norm1(x), bias, cls_only)
        x = (x[:, :1] if cls_only else x) + self.drop_path(attn)
        return x + self.drop_path(self.mlp(self.norm2(x)))
