"""Mask in Mask (mim_method.md §3): the three levels of masked volumes, as pure tensor functions.

Conventions (the public API's contract):
- a token mask is ``(M, L)`` with 1 = masked; tokens are in C order of the array axes of the token grid;
- octants are indexed in C order of the 2x2x2 octant grid (``o = 4*od + 2*oh + ow``);
- level 1 is the whole ``(2S)^3`` crop trilinearly down-sampled to ``S^3``, masked by *true spatial octants*
  of its token grid (the public code's 27-raster-token slabs are a known bug, not followed);
- level 2 is the native-resolution ``S^3`` octants of the crop under the masked level-1 octants
  (``parents``: the octant index; ``parent_volume``: the sample);
- level 3 is, per level-2 volume, ``children_per_volume`` random masked tokens' 16^3 patches, trilinearly
  up-sampled (``align_corners=False``) to ``S^3`` (``parents``: ``(volume, token)``).
Random draws use ``generator`` (a CPU ``torch.Generator``), so the same seed gives the same masks on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOKEN = 16


@dataclass
class LevelInput:
    inputs: torch.Tensor  # (M, C, S, S, S)
    masks: torch.Tensor  # (M, L) float, 1 = masked
    parents: torch.Tensor | None  # level 2: (M,) octant; level 3: (M, 2) (level-2 volume, token)
    parent_volume: torch.Tensor | None  # (M,) index of the parent-level volume


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def random_subset(rows: int, units: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(rows, count)`` distinct unit indices per row, sorted ascending, uniformly at random."""
    idx = torch.argsort(_rand((rows, units), generator), dim=1)[:, :count]
    return idx.sort(dim=1).values


def octant_tokens(grid: int) -> torch.Tensor:
    """``(8, (grid/2)^3)`` token indices (C order) of each octant of a cubic token grid."""
    if grid % 2:
        raise ValueError(f"octants need an even token grid, got {grid}")
    h = grid // 2
    ids = torch.arange(grid**3).view(grid, grid, grid)
    return torch.stack(
        [ids[d * h:(d + 1) * h, y * h:(y + 1) * h, x * h:(x + 1) * h].reshape(-1)
         for d in range(2) for y in range(2) for x in range(2)]
    )


def octant_mask(octants: torch.Tensor, grid: int) -> torch.Tensor:
    """Token mask ``(N, grid^3)`` with the tokens of the given ``(N, k)`` octants masked."""
    table = octant_tokens(grid).to(octants.device)
    mask = torch.zeros(octants.shape[0], grid**3, device=octants.device)
    mask.scatter_(1, table[octants].flatten(1), 1.0)
    return mask


def token_mask(rows: int, num_tokens: int, num_masked: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random token masks ``(rows, num_tokens)`` with exactly ``num_masked`` ones per row."""
    mask = torch.zeros(rows, num_tokens)
    return mask.scatter_(1, random_subset(rows, num_tokens, num_masked, generator), 1.0)


def octant_crops(crops: torch.Tensor, octants: torch.Tensor) -> torch.Tensor:
    """Native-resolution octants of ``(N, C, 2S, 2S, 2S)`` crops: ``(N*k, C, S, S, S)``, sample-major."""
    n, c, two_s = crops.shape[0], crops.shape[1], crops.shape[2]
    s = two_s // 2
    # (N, C, 2, S, 2, S, 2, S) -> (N, 8, C, S, S, S) with the octant axis in C order.
    split = crops.view(n, c, 2, s, 2, s, 2, s).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, 8, c, s, s, s)
    return split[torch.arange(n, device=crops.device)[:, None], octants.to(crops.device)].flatten(0, 1)


def token_patches(volumes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """16^3 patches of ``(M, C, S, S, S)`` volumes at ``(M, k)`` token indices: ``(M*k, C, 16, 16, 16)``."""
    m, c, s = volumes.shape[0], volumes.shape[1], volumes.shape[2]
    g = s // TOKEN
    patches = volumes.view(m, c, g, TOKEN, g, TOKEN, g, TOKEN).permute(0, 2, 4, 6, 1, 3, 5, 7)
    patches = patches.reshape(m, g**3, c, TOKEN, TOKEN, TOKEN)
    return patches[torch.arange(m, device=volumes.device)[:, None], tokens.to(volumes.device)].flatten(0, 1)


def mask_in_mask(
    crops: torch.Tensor,
    levels: int,
    num_masked: tuple[int, ...],
    children_per_volume: int,
    level1_masking: str = "octant",
    generator: torch.Generator | None = None,
) -> list[LevelInput]:
    """Build every level's inputs and masks from a batch of ``(N, C, 2S, 2S, 2S)`` crops.

    ``num_masked[i]`` is the number of masked units per volume at level ``i+1`` (octants at level 1 with octant
    masking, tokens otherwise). All randomness is drawn here, before any network call, so that every level can
    go through the encoder in one batched call.
    """
    n, two_s = crops.shape[0], crops.shape[2]
    if crops.ndim != 5 or crops.shape[2:] != (two_s,) * 3 or two_s % (4 * TOKEN):
        raise ValueError(f"crops must be (N, C, 2S, 2S, 2S) with S a multiple of 32, got {tuple(crops.shape)}")
    s = two_s // 2
    g = s // TOKEN
    dev = crops.device
    x1 = F.interpolate(crops, size=(s, s, s), mode="trilinear", align_corners=False)
    if level1_masking == "octant":
        octants = random_subset(n, 8, num_masked[0], generator)
        m1 = octant_mask(octants, g)
    else:
        octants = None
        m1 = token_mask(n, g**3, num_masked[0], generator)
    out = [LevelInput(x1, m1.to(dev), None, None)]
    if levels == 1:
        return out
    k = octants.shape[1]
    x2 = octant_crops(crops, octants)
    m2 = token_mask(n * k, g**3, num_masked[1], generator)
    sample = torch.arange(n).repeat_interleave(k)
    out.append(LevelInput(x2, m2.to(dev), octants.flatten().to(dev), sample.to(dev)))
    if levels == 2:
        return out
    # Pick children among each level-2 volume's masked tokens: rank the masked ones in a random order.
    ranked = torch.argsort(_rand(m2.shape, generator) - m2, dim=1)  # masked tokens (score < 0) first
    children = ranked[:, :children_per_volume].sort(dim=1).values
    patches = token_patches(x2, children)
    x3 = F.interpolate(patches, size=(s, s, s), mode="trilinear", align_corners=False)
    m3 = token_mask(x3.shape[0], g**3, num_masked[2], generator)
    volume = torch.arange(n * k).repeat_interleave(children_per_volume)
    parents = torch.stack([volume, children.flatten()], dim=1)
    out.append(LevelInput(x3, m3.to(dev), parents.to(dev), volume.to(dev)))
    return out
