"""Positional encodings: learnable absolute (APE), fixed 2-D sin-cos, and Swin-style relative bias (RPE)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "build_relative_position_index",
    "num_relative_positions",
    "sincos_2d",
    "AbsolutePositionEmbedding",
    "RelativePositionBias",
]


def num_relative_positions(grid: tuple[int, int]) -> int:
    """Distinct 2-D offsets on an H×W grid: (2H−1)(2W−1)."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1)


def build_relative_position_index(grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Swin index ``(h_i−h_j+H−1)·(2W−1) + (w_i−w_j+W−1)`` for every token pair, row-major patches.

    With ``cls_token`` the result is ``(N+1, N+1)`` and the CLS slot gets three extra table rows as in BEiT:
    T for CLS→patch (row 0), T+1 for patch→CLS (column 0), T+2 for CLS→CLS, where T = (2H−1)(2W−1).
    Without it: ``(N, N)``. Returns int64.
    """
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    if not cls_token:
        return index
    t = num_relative_positions(grid)
    n = h * w
    full = torch.empty(n + 1, n + 1, dtype=torch.long)
    full[1:, 1:] = index
    full[0, 1:] = t
    full[1:, 0] = t + 1
    full[0, 0] = t + 2
    return full


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``(H·W, dim)``: half the channels encode the row, half the column.

    Each half is the 1-D ``PE(pos, 2i) = sin(pos / T^(2i/d))``, ``PE(pos, 2i+1) = cos(…)`` of the seed.
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angle = pos[:, None] * omega[None, :]  # (N, dim/4)
        parts.append(torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1))  # interleaved sin, cos
    return torch.cat(parts, dim=1).float()


class AbsolutePositionEmbedding(nn.Module):
    """Added to the tokens (CLS slot included): learnable, or fixed sin-cos (CLS slot zero)."""

    def __init__(self, grid: tuple[int, int], dim: int, learnable: bool = True):
        super().__init__()
        n = grid[0] * grid[1]
        if learnable:
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            table = torch.cat([torch.zeros(1, dim), sincos_2d(grid, dim)])[None]
            self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N+1, D)."""
        return x + self.pos_embed

    def patch_embeddings(self) -> torch.Tensor:
        """(N, D): the embeddings of the patch slots, CLS excluded."""
        return self.pos_embed[0, 1:]


class RelativePositionBias(nn.Module):
    """One layer's table ``[(2H−1)(2W−1)+3, heads]``, zero-initialised, looked up into ``(heads, N+1, N+1)``."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_positions(grid) + 3, heads))
        self.register_buffer("relative_position_index", build_relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        """The bias for every (query, key) token pair: (heads, N+1, N+1), contiguous."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()
