"""Fixed 3D sin-cos position embeddings (mim_method.md §1, §2).

Owns the sin-cos tables and nothing else. The table is computable for any token grid, which fine-tuning needs
because its patch sizes vary; every loader that adapts a position embedding to a new grid goes through
:func:`adapt_pos_embed` (there is one weight-adaptation path, as in timm).

Why the table is recomputed, not resampled: the MiM planner keeps the pre-training spacing, so a larger patch
covers a larger field of view with tokens of the same physical size. Token ``i`` of any grid is then at the same
distance from token 0 as in pre-training, and the table the encoder learned to read is the sin-cos code of the
integer positions ``0 .. n-1``. Stretching the pre-training table over the new grid (trilinear resampling) would
encode a 10-token axis as positions 0, 0.4, 1.0, 1.6, ... 5.0 instead of 0 .. 9, and since the table is a buffer,
fine-tuning could never repair it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# A stored table that equals the sin-cos table of its grid to this tolerance is that table (float32 rounding,
# or a converted table computed by another implementation: ~1e-7).
SINCOS_ATOL = 1e-4


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1D table: half sines, half cosines, frequencies 1 / 10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


# Which array axis each third of the width encodes. Ours: (0, 1, 2). Weights converted from the authors' (x, y, z)
# arrays to our (z, y, x) arrays keep each token's vector, so their thirds encode our axes (2, 1, 0) (convert.py).
AXES_NATIVE = (0, 1, 2)
AXES_CONVERTED = (2, 1, 0)


def sincos_pos_embed_3d(
    dim: int, grid: tuple[int, int, int], axes: tuple[int, int, int] = AXES_NATIVE
) -> torch.Tensor:
    """Return a ``(D*H*W, dim)`` float32 table for a token grid, tokens in C order of the array axes.

    The width is split in three equal parts; part ``k`` encodes the position along array axis ``axes[k]`` (so
    ``dim`` must be divisible by 6).
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos embedding needs a width divisible by 6, got {dim}")
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"axes must be a permutation of (0, 1, 2), got {axes}")
    d, h, w = grid
    coords = [c.reshape(-1) for c in torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")]
    part = dim // 3
    emb = torch.cat([_sincos_1d(part, coords[a]) for a in axes], dim=1)
    return emb.float()


def sincos_axes(pos_embed: torch.Tensor, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The axis order of a ``(1, L, D)`` table that is a sin-cos table of ``grid``, or None if it is none."""
    if pos_embed.shape[1] != grid[0] * grid[1] * grid[2] or pos_embed.shape[-1] % 6:
        return None
    table = pos_embed[0].detach().float().cpu()  # the reference tables are computed on the CPU
    for axes in (AXES_NATIVE, AXES_CONVERTED, (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1)):
        want = sincos_pos_embed_3d(pos_embed.shape[-1], grid, axes)
        if torch.allclose(table, want, atol=SINCOS_ATOL, rtol=0.0):
            return axes
    return None


def is_sincos_table(pos_embed: torch.Tensor, grid: tuple[int, int, int]) -> bool:
    """Whether a ``(1, L, D)`` table is a fixed sin-cos table of ``grid`` (tokens in C order, any axis order)."""
    return sincos_axes(pos_embed, grid) is not None


def adapt_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int]
) -> tuple[torch.Tensor, str]:
    """The position table for ``new_grid`` from a checkpoint's ``(1, L, D)`` table of ``old_grid``.

    Returns the table and how it was obtained: ``"unchanged"`` (same grid), ``"recomputed"`` (the checkpoint
    holds the fixed sin-cos table, as every MiM checkpoint does: the exact table at the integer token positions of
    the new grid, in the checkpoint's axis order of the thirds) or ``"resampled"`` (any other table, e.g. a learned one: trilinear resampling, with a warning).
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    _check_length(pos_embed, old_grid)
    if old_grid == new_grid:
        return pos_embed.clone(), "unchanged"
    axes = sincos_axes(pos_embed, old_grid)
    if axes is not None:  # the same axis order as the checkpoint (converted weights: AXES_CONVERTED)
        return sincos_pos_embed_3d(pos_embed.shape[-1], new_grid, axes)[None].to(pos_embed), "recomputed"  # dtype, device
    log.warning(
        "position embedding is not the fixed sin-cos table of its grid %s: resampling it trilinearly to %s",
        old_grid,
        new_grid,
    )
    return resize_pos_embed(pos_embed, old_grid, new_grid), "resampled"


def _check_length(pos_embed: torch.Tensor, grid: tuple[int, ...]) -> None:
    length = pos_embed.shape[1]
    if length != grid[0] * grid[1] * grid[2]:
        raise ValueError(
            f"position embedding has {length} tokens, grid {grid} needs {grid[0] * grid[1] * grid[2]}"
        )


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Resample a ``(1, L, D)`` position embedding from one token grid to another (trilinear, timm-style).

    Only for tables that are not the fixed sin-cos table (see :func:`adapt_pos_embed`): resampling a sin-cos
    table stretches its positions. Same grid: an unchanged copy.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    _check_length(pos_embed, old_grid)
    n, _, dim = pos_embed.shape
    if old_grid == new_grid:
        return pos_embed.clone()
    grid = pos_embed.float().transpose(1, 2).reshape(n, dim, *old_grid)
    grid = torch.nn.functional.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)
    return grid.reshape(n, dim, -1).transpose(1, 2).to(pos_embed.dtype).contiguous()
