"""Building blocks shared by the encoder and the MAE decoder: channel LayerNorm, conv block, ViT block.

Pure torch; no masking policy lives here beyond the "multiply by the visible indicator" hook of the conv block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (drops the whole residual branch)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``(N, C, D, H, W)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class Downsample(nn.Sequential):
    """Conv3d k=2 s=2, channel LayerNorm, GELU (mim_method.md §1). Non-overlapping, so it never mixes tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Conv3d(in_dim, out_dim, kernel_size=2, stride=2), LayerNorm3d(out_dim, eps=1e-6), nn.GELU())


class _DepthwiseConv3dCPU(torch.autograd.Function):
    """Depthwise "same" conv (stride 1, odd kernel) with a fast CPU backward.

    PyTorch's CPU backward of a depthwise Conv3d is pathologically slow (measured on the 2-core CPU, a
    (21, 24, 32^3) tensor with a 5^3 kernel: 131 s for forward + backward in NCDHW, 13.8 s in channels-last).
    The same maths through faster kernels: forward and input-gradient as channels-last depthwise convs (the input
    gradient is the conv of the output gradient with the flipped kernel), the weight gradient as an FFT
    cross-correlation summed over the batch. Together about 1.5 s for that tensor; identical results up to
    float rounding (tested against autograd in float64).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        pad = weight.shape[-1] // 2
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(xc, weight, bias, padding=pad, groups=x.shape[1]).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        pad = k // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gc = grad.contiguous(memory_format=torch.channels_last_3d)
            grad_x = F.conv3d(gc, weight.flip(2, 3, 4), padding=pad, groups=x.shape[1]).contiguous()
        if ctx.needs_input_grad[1]:
            # grad_w[c, a, b, e] = sum_n,p xpad[n, c, p + (a, b, e)] * grad[n, c, p]: a cross-correlation whose
            # lags 0..k-1 never wrap around an FFT of the padded size.
            dtype = torch.promote_types(x.dtype, torch.float32)  # FFTs need at least float32
            xp = F.pad(x.to(dtype), (pad,) * 6)
            gp = F.pad(grad.to(dtype), (0, 2 * pad) * 3)
            dims = (2, 3, 4)
            spec = (torch.fft.rfftn(xp, dim=dims) * torch.fft.rfftn(gp, dim=dims).conj()).sum(0)
            corr = torch.fft.irfftn(spec, s=xp.shape[2:], dim=(1, 2, 3))
            grad_w = corr[:, :k, :k, :k].unsqueeze(1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)`` with the fast CPU path above (same parameters)."""

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return _DepthwiseConv3dCPU.apply(x, self.weight, self.bias)
        return super().forward(x)


class ConvBlock(nn.Module):
    """``x + PW(DW5(visible * PW(LN(x))))`` then ``x + MLP(LN(x))`` with 1x1x1 convs.

    ``visible`` (1 = visible voxel) multiplies the features right before the depthwise conv, so that visible
    positions never see masked voxels (masked convolution, mim_method.md §1).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm3d(dim, eps=1e-6)
        self.pw1 = nn.Conv3d(dim, dim, 1)
        self.dw = DepthwiseConv3d(dim, 5)
        self.pw2 = nn.Conv3d(dim, dim, 1)
        self.norm2 = LayerNorm3d(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv3d(dim, hidden, 1), nn.GELU(), nn.Conv3d(hidden, dim, 1))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pw1(self.norm1(x))
        if visible is not None:
            y = y * visible
        x = x + drop_path(self.pw2(self.dw(y)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused kernels where available)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm ViT block: attention + MLP, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
