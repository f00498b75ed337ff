"""The fine-tuning segmentation network (mim_method.md §6): the MiM hybrid encoder + a U-shaped decoder.

Owns the network only (pure torch: no nnU-Net, no files, no checkpoint loading). The encoder is the pre-training
:class:`HybridEncoder`, embedded unchanged under the attribute ``encoder`` so that the checkpoint's ``encoder.*``
tensors load 1:1. The decoder is UNETR/SwinUNETR-style: at each step a transposed conv (x2), concatenation with
the skip of that resolution, then a residual conv block (3^3 conv, instance norm, LeakyReLU). Skips come from the
raw input (stride 1, through one residual block), the three conv stages (strides 2, 4, 8) and the transformer
token map (stride 16, the bottleneck). One 1x1x1 output head per decoder resolution (strides 1, 2, 4, 8) serves
nnU-Net's deep supervision; the constructor takes nnU-Net's ``input_channels``, ``num_classes`` and
``deep_supervision`` arguments and the plans' ``strides`` (which nnU-Net reads for the deep-supervision scales).

Any patch size whose axes are multiples of 16 works. The encoder's position-embedding buffer is built for the
``patch_size`` token grid; the fine-tuning loader overwrites it with the checkpoint's table adapted to that grid.

``feature_norm`` says how the encoder's four feature maps are normalised before the decoder:
``"final"`` applies the pre-training final ``norm`` (learned LayerNorm) to the token map only and passes the conv
stages as they are; ``"per_map"`` drops that norm and normalises each of the four maps over its channels with a
parameter-free LayerNorm, as the authors' fine-tuning backbone does (authors_checkpoint.md). The choice is in the
plans' ``arch_kwargs``, so prediction rebuilds the same network; the constructor default stays ``"final"`` so
that plans written before the switch existed rebuild the network they were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TOKEN_SIZE
from .encoder import HybridEncoder

# The encoder is four stride-2 stages: the only stride pattern this network supports.
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
FEATURE_NORMS = ("final", "per_map")
PER_MAP_EPS = 1e-5  # nn.LayerNorm's default, what a parameter-free LayerNorm without an explicit eps uses


def per_map_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the channel axis of an ``(N, C, D, H, W)`` feature map."""
    return F.layer_norm(x.movedim(1, -1), x.shape[1:2], eps=PER_MAP_EPS).movedim(-1, 1)


def default_decoder_dims(dims: Sequence[int]) -> tuple[int, int, int, int]:
    """Decoder widths at strides 1, 2, 4, 8: the encoder's widths, and at most 32 channels at full resolution."""
    return (min(32, dims[0]), dims[0], dims[1], dims[2])


class ResBlock(nn.Module):
    """conv3-IN-LReLU-conv3-IN plus a (1x1x1 conv + IN where widths differ) shortcut, then LReLU."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_dim, out_dim, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_dim, affine=True)
        self.conv2 = nn.Conv3d(out_dim, out_dim, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_dim, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut = (
            nn.Identity()
            if in_dim == out_dim
            else nn.Sequential(
                nn.Conv3d(in_dim, out_dim, 1, bias=False), nn.InstanceNorm3d(out_dim, affine=True)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


class UpBlock(nn.Module):
    """Transposed conv (k=s=2) to the skip's resolution, concatenation, residual block."""

    def __init__(self, in_dim: int, skip_dim: int, out_dim: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_dim, out_dim, kernel_size=2, stride=2)
        self.block = ResBlock(out_dim + skip_dim, out_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class MiMDecoder(nn.Module):
    """U-shaped decoder over the encoder's four feature maps and the raw input.

    ``deep_supervision`` is the attribute nnU-Net's trainer toggles (``network.decoder.deep_supervision``).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        dims: Sequence[int],
        decoder_dims: Sequence[int],
        deep_supervision: bool,
    ):
        super().__init__()
        d0, d1, d2, d3 = decoder_dims
        self.deep_supervision = deep_supervision
        self.input_block = ResBlock(input_channels, d0)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(dims[3], dims[2], d3),  # stride 16 -> 8, skip: conv stage 3
                UpBlock(d3, dims[1], d2),  # 8 -> 4, skip: conv stage 2
                UpBlock(d2, dims[0], d1),  # 4 -> 2, skip: conv stage 1
                UpBlock(d1, d0, d0),  # 2 -> 1, skip: the raw input after one residual block
            ]
        )
        # Heads in decoding order (stride 8, 4, 2, 1); outputs are returned full resolution first.
        self.seg_layers = nn.ModuleList(nn.Conv3d(d, num_classes, 1) for d in (d3, d2, d1, d0))

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        skips = [features[2], features[1], features[0], self.input_block(x)]
        y = features[3]
        outputs = []
        for i, (up, skip) in enumerate(zip(self.up_blocks, skips)):
            y = up(y, skip)
            if self.deep_supervision or i == len(self.up_blocks) - 1:
                outputs.append(self.seg_layers[i](y))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]


class MiMSegmentationNetwork(nn.Module):
    """Hybrid encoder (parameter names as in pre-training, under ``encoder.``) + :class:`MiMDecoder`.

    Returns logits ``(N, num_classes, *patch)``; with deep supervision a list, full resolution first, then
    strides 2, 4 and 8 (the scales nnU-Net derives from ``strides``).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        dims: Sequence[int] = (48, 96, 192, 384),
        conv_depths: Sequence[int] = (2, 2, 2),
        depth: int = 11,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        decoder_dims: Sequence[int] | None = None,
        strides: Sequence[Sequence[int]] = STRIDES,
        deep_supervision: bool = True,
        grad_checkpointing: bool = False,
        conv_ln_eps: float = 1e-6,
        feature_norm: str = "final",
    ):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.feature_norm = feature_norm
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or any(p % TOKEN_SIZE or p <= 0 for p in patch_size):
            raise ValueError(f"patch_size must be three positive multiples of {TOKEN_SIZE}, got {patch_size}")
        if tuple(tuple(s) for s in strides) != STRIDES:
            raise ValueError(f"the hybrid encoder has fixed strides {STRIDES}, plans give {strides}")
        self.patch_size = patch_size
        self.encoder = HybridEncoder(
            in_channels=input_channels,
            dims=tuple(dims),
            conv_depths=tuple(conv_depths),
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            input_size=patch_size,
            conv_ln_eps=conv_ln_eps,
            grad_checkpointing=grad_checkpointing,
        )
        if feature_norm == "per_map":
            # The final norm is not used; frozen, so that DDP (which nnU-Net runs without find_unused_parameters)
            # does not wait for its gradients. It stays in the state dict: the checkpoint's keys load 1:1.
            self.encoder.norm.requires_grad_(False)
        decoder_dims = tuple(decoder_dims) if decoder_dims is not None else default_decoder_dims(dims)
        self.decoder = MiMDecoder(input_channels, num_classes, tuple(dims), decoder_dims, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if any(s % TOKEN_SIZE for s in x.shape[2:]):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} is not a multiple of {TOKEN_SIZE}")
        if self.feature_norm == "final":
            return self.decoder(x, self.encoder(x))
        return self.decoder(x, [per_map_norm(f) for f in self.encoder(x, final_norm=False)])
