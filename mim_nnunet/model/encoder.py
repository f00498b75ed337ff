"""The hybrid conv + transformer encoder (mim_method.md §1), shared by pre-training and fine-tuning.

Three conv stages (stride 2 each, masked depthwise convs) and one transformer stage on 16^3 tokens. Parameter
names here are the contract with fine-tuning: the segmentation network embeds this module unchanged.
The multi-scale fusion of pre-training is *not* part of the encoder (it is dropped at fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block, ConvBlock, Downsample, downsample_rows
from .packed import PackedLayout
from .pos_embed import adapt_pos_embed, sincos_pos_embed_3d


class HybridEncoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        dims: tuple[int, int, int, int] = (48, 96, 192, 384),
        conv_depths: tuple[int, int, int] = (2, 2, 2),
        depth: int = 11,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        input_size: int | tuple[int, int, int] = 96,
        conv_ln_eps: float = 1e-6,
        grad_checkpointing: bool = False,
        checkpoint_chunk: int = 4,
    ):
        super().__init__()
        self.dims = tuple(dims)
        self.grad_checkpointing = grad_checkpointing
        self.checkpoint_chunk = checkpoint_chunk
        n_blocks = sum(conv_depths) + depth
        rates = torch.linspace(0, drop_path_rate, n_blocks).tolist()
        chans = (in_channels,) + self.dims[:3]
        self.downsamples = nn.ModuleList(Downsample(chans[i], chans[i + 1], conv_ln_eps) for i in range(3))
        self.stages = nn.ModuleList()
        k = 0
        for i in range(3):
            self.stages.append(nn.ModuleList(ConvBlock(dims[i], mlp_ratio, rates[k + j], conv_ln_eps) for j in range(conv_depths[i])))
            k += conv_depths[i]
        self.token_downsample = Downsample(dims[2], dims[3], conv_ln_eps)
        self.token_proj = nn.Linear(dims[3], dims[3])
        self.blocks = nn.ModuleList(Block(dims[3], num_heads, mlp_ratio, rates[k + j]) for j in range(depth))
        self.norm = nn.LayerNorm(dims[3], eps=1e-6)
        size = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
        self.pos_grid = tuple(s // 16 for s in size)
        # Fixed (not trained), but persistent so that a checkpoint carries it and fine-tuning can resample it.
        self.register_buffer("pos_embed", sincos_pos_embed_3d(dims[3], self.pos_grid)[None], persistent=True)

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if tuple(grid) == self.pos_grid:
            return self.pos_embed
        if self.pos_embed.device.type == "meta":  # shape-only runs (the planner's memory model): no values
            return sincos_pos_embed_3d(self.dims[3], tuple(grid))[None].to(self.pos_embed)
        # Through the one adaptation path: keeps the axis order of a loaded (e.g. converted) table.
        return adapt_pos_embed(self.pos_embed, self.pos_grid, tuple(grid))[0]

    def _block(self, block: ConvBlock, x: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        if not self._checkpointing():
            return block(x, visible)
        # Checkpoint in chunks of volumes: the recomputation in backward then holds one chunk's activations.
        c = self.checkpoint_chunk
        vis = [None] * len(x.split(c)) if visible is None else visible.split(c)
        return torch.cat([checkpoint(block, xc, vc, use_reentrant=False) for xc, vc in zip(x.split(c), vis)])

    def forward_conv(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Conv stages and tokenisation.

        ``token_mask``: ``(N, L)``, 1 = masked, tokens in C order of the token grid. Returns the three conv-stage
        outputs and all ``(N, L, D)`` tokens (projected, position embedding added).
        """
        grid = tuple(s // 16 for s in x.shape[2:])
        visible = None
        if token_mask is not None:
            visible = (1.0 - token_mask.to(x.dtype)).view(x.shape[0], 1, *grid)
        stages = []
        for i, (down, blocks) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)
            vis = None
            if visible is not None:
                vis = F.interpolate(visible, scale_factor=2 ** (3 - i), mode="nearest").to(x.dtype)
            for block in blocks:
                x = self._block(block, x, vis)
            stages.append(x)
        tokens = self.token_downsample(x).flatten(2).transpose(1, 2)
        tokens = self.token_proj(tokens) + self.position_embedding(grid).to(tokens.dtype)
        return stages, tokens

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def forward_conv_packed(self, x: torch.Tensor, layout: PackedLayout) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`forward_conv` computed on the visible voxels only (see :mod:`.packed`).

        Returns the three conv-stage outputs as packed rows ``(K * p^3, C)`` (p = 8, 4, 2 voxels per token side)
        and the visible tokens ``(K, D)`` (projected, position embedding added), K = ``layout.num_visible``.
        Equal, up to float rounding, to the visible part of :meth:`forward_conv`.
        """
        rows = layout.gather_input(x)
        stages = []
        for i, (down, blocks) in enumerate(zip(self.downsamples, self.stages)):
            rows = downsample_rows(down, rows)
            p = 8 >> i
            index, shape, per_volume = layout.voxel_index(p), layout.shape(p), layout.rows_per_volume(p)
            for block in blocks:
                if self._checkpointing():
                    rows = checkpoint(block.forward_packed, rows, index, shape, per_volume, use_reentrant=False)
                else:
                    rows = block.forward_packed(rows, index, shape, per_volume)
            stages.append(rows)
        tokens = self.token_proj(downsample_rows(self.token_downsample, rows))
        tokens = tokens + self.position_embedding(layout.grid)[0].to(tokens.dtype).index_select(0, layout.token)
        return stages, tokens

    def forward_blocks_packed(self, tokens: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """:meth:`forward_blocks` on packed ``(K, D)`` tokens: no padding, one attention call per run of volumes."""
        for block in self.blocks:
            if self._checkpointing():
                tokens = checkpoint(block.forward_packed, tokens, layout.runs, layout.counts, use_reentrant=False)
            else:
                tokens = block.forward_packed(tokens, layout.runs, layout.counts)
        return tokens

    def forward_blocks(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self._checkpointing():
                tokens = checkpoint(block, tokens, attn_mask, use_reentrant=False)
            else:
                tokens = block(tokens, attn_mask)
        return tokens

    def forward(self, x: torch.Tensor, final_norm: bool = True) -> list[torch.Tensor]:
        """Unmasked features for fine-tuning: stage 1-3 maps and the token map ``(N, D, S/16, S/16, S/16)``.

        ``final_norm=False`` leaves out the pre-training ``norm`` on the token map (what the authors'
        fine-tuning backbone does; see ``MiMSegmentationNetwork``'s ``feature_norm``).
        """
        stages, tokens = self.forward_conv(x)
        tokens = self.forward_blocks(tokens)
        if final_norm:
            tokens = self.norm(tokens)
        grid = tuple(s // 16 for s in x.shape[2:])
        return stages + [tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)]
