"""Fixed 3D sin-cos position embeddings (mim_method.md §1, §2).

Owns the sin-cos tables and nothing else. The table is computable for any token grid, which fine-tuning needs
because its patch sizes vary; every loader that adapts a position embedding to a new grid goes through
:func:`sincos_pos_embed_3d` (there is one weight-adaptation path, as in timm).
"""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1D table: half sines, half cosines, frequencies 1 / 10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Return a ``(D*H*W, dim)`` float32 table for a token grid, tokens in C order of the array axes.

    The width is split in three equal parts, one per axis (so ``dim`` must be divisible by 6).
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos embedding needs a width divisible by 6, got {dim}")
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    part = dim // 3
    emb = torch.cat(
        [
            _sincos_1d(part, zz.reshape(-1)),
            _sincos_1d(part, yy.reshape(-1)),
            _sincos_1d(part, xx.reshape(-1)),
        ],
        dim=1,
    )
    return emb.float()


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Resample a ``(1, L, D)`` position embedding from one token grid to another (trilinear, timm-style).

    This is the one weight-adaptation path for position embeddings: fine-tuning on a patch whose token grid
    differs from the pre-training grid calls it on the checkpoint's table. Same grid: an unchanged copy.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    n, length, dim = pos_embed.shape
    if length != old_grid[0] * old_grid[1] * old_grid[2]:
        raise ValueError(
            f"position embedding has {length} tokens, grid {old_grid} needs {old_grid[0] * old_grid[1] * old_grid[2]}"
        )
    if old_grid == new_grid:
        return pos_embed.clone()
    grid = pos_embed.float().transpose(1, 2).reshape(n, dim, *old_grid)
    grid = torch.nn.functional.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)
    return grid.reshape(n, dim, -1).transpose(1, 2).to(pos_embed.dtype).contiguous()
