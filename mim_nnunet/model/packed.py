"""Packed execution of masked volumes: only visible voxels are stored and computed.

Masked convolution (mim_method.md §1) never lets a visible position see a masked voxel, and nothing downstream
reads the features at masked positions (only visible tokens enter the transformer and the fusion). So the masked
half of every conv stage is dead work in the dense formulation. The packed layout keeps, per conv stage, the
features of the visible voxels only, as ``(rows, C)``:

- rows are grouped by visible token (volume-major, token ids ascending: the order of ``forward_encoder``'s ids);
- inside a token, voxels follow a Morton (z-order) curve whose *finest* octant digit is the least significant,
  ``digit = dz * 4 + dy * 2 + dx``. So every 8 consecutive rows form one 2x2x2 block in C order of a stride-2
  kernel: the stride-2 down-sampling convs become a reshape + Linear, and the k = s fusion convs of a stage
  become a reshape + Linear per token.

Only the depthwise 5^3 conv needs the spatial grid: rows are scattered into a zero channels-last grid, convolved
and gathered back (see :meth:`ConvBlock.forward_packed`). The transformer runs on packed tokens too, one attention
call per run of volumes with equal visible-token counts (no padding, no attention mask).
"""

from __future__ import annotations

from functools import cache

import torch

from .config import TOKEN_SIZE


@cache
def morton_offsets(p: int) -> torch.Tensor:
    """``(p^3, 3)`` voxel offsets (z, y, x) inside a ``p^3`` cube in Morton order, finest digit least significant."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Morton order needs a power-of-two side, got {p}")
    idx = torch.arange(p**3)
    zyx = torch.zeros(p**3, 3, dtype=torch.long)
    for level in range(p.bit_length() - 1):
        digit = (idx >> (3 * level)) & 7
        zyx[:, 0] |= ((digit >> 2) & 1) << level
        zyx[:, 1] |= ((digit >> 1) & 1) << level
        zyx[:, 2] |= (digit & 1) << level
    return zyx


def morton_kernel_order(p: int) -> torch.Tensor:
    """C-order (flat) kernel positions of a ``p^3`` kernel, listed in Morton order."""
    z, y, x = morton_offsets(p).unbind(1)
    return (z * p + y) * p + x


class PackedLayout:
    """Where the visible voxels of a batch of masked volumes live, at every stride of the encoder.

    ``mask``: ``(B, L)``, 1 = masked, tokens in C order of ``grid`` (the token grid of the volumes).
    """

    def __init__(self, mask: torch.Tensor, grid: tuple[int, int, int]):
        if mask.ndim != 2 or mask.shape[1] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match a token grid {grid}")
        self.batch = mask.shape[0]
        self.grid = tuple(grid)
        self.device = mask.device
        visible = mask == 0
        self.volume, self.token = visible.nonzero(as_tuple=True)  # volume-major, token ids ascending
        self.counts = visible.sum(dim=1)  # visible tokens per volume
        counts = self.counts.tolist()
        self.runs: list[tuple[int, int]] = []  # consecutive volumes with equal visible-token counts
        for c in counts:
            if self.runs and self.runs[-1][1] == c:
                self.runs[-1] = (self.runs[-1][0] + 1, c)
            else:
                self.runs.append((1, c))
        self._index: dict[int, torch.Tensor] = {}

    @property
    def num_visible(self) -> int:
        return int(self.token.shape[0])

    def shape(self, p: int) -> tuple[int, int, int, int]:
        """``(B, D, H, W)`` of the grid at ``p`` voxels per token side."""
        return (self.batch,) + tuple(g * p for g in self.grid)

    def voxel_index(self, p: int) -> torch.Tensor:
        """Flat index into the channels-last grid :meth:`shape` ``(p)`` of every packed row, ``(K * p^3,)``."""
        if p not in self._index:
            g0, g1, g2 = self.grid
            tz, ty, tx = self.token // (g1 * g2), (self.token // g2) % g1, self.token % g2
            off = morton_offsets(p).to(self.device)
            z = tz[:, None] * p + off[:, 0]
            y = ty[:, None] * p + off[:, 1]
            x = tx[:, None] * p + off[:, 2]
            _, d, h, w = self.shape(p)
            self._index[p] = (((self.volume[:, None] * d + z) * h + y) * w + x).reshape(-1)
        return self._index[p]

    def rows_per_volume(self, p: int) -> torch.Tensor:
        return self.counts * p**3

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        """The visible 16^3 patches of ``x (B, C, D, H, W)`` as ``(K * 16^3, C)`` rows in the packed order."""
        c = x.shape[1]
        flat = x.permute(0, 2, 3, 4, 1).reshape(-1, c)
        return flat.index_select(0, self.voxel_index(TOKEN_SIZE))

    def pad(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(K, D)`` token rows -> ``(B, k_max, D)`` with a validity mask ``(B, k_max)``."""
        k = int(self.counts.max()) if self.batch else 0
        valid = torch.arange(k, device=self.device)[None, :] < self.counts[:, None]
        flat = valid.reshape(-1).nonzero(as_tuple=True)[0]
        out = rows.new_zeros(self.batch * k, rows.shape[1]).index_copy(0, flat, rows)
        return out.view(self.batch, k, rows.shape[1]), valid
