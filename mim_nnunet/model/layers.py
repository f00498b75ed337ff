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
    """Conv3d k=2 s=2, channel LayerNorm, GELU (mim_method.md §1). Non-overlapping, so it never mixes tokens.

    ``eps`` of the LayerNorm: see ``MiMConfig.conv_ln_eps`` (1e-5 in the authors' weights, 1e-6 in ours).
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__(nn.Conv3d(in_dim, out_dim, kernel_size=2, stride=2), LayerNorm3d(out_dim, eps=eps), nn.GELU())


def _depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, channel_dim: int, chunk: int = 4) -> torch.Tensor:
    """Weight gradient ``(C, 1, k, k, k)`` of a depthwise "same" conv, as an FFT cross-correlation.

    ``grad_w[c, a, b, e] = sum_{n, p} xpad[n, c, p + (a, b, e)] * grad[n, c, p]``; with ``grad`` zero-padded to the
    padded size, the lags 0..k-1 never wrap around. ``x`` and ``grad`` are ``(N, C, D, H, W)`` (``channel_dim=1``)
    or channels-last ``(N, D, H, W, C)`` (``channel_dim=4``); the spectra are summed over chunks of ``chunk``
    volumes, which bounds the transient memory.
    """
    pad = k // 2
    dims = (2, 3, 4) if channel_dim == 1 else (1, 2, 3)
    tail = () if channel_dim == 1 else (0, 0)  # F.pad lists the last dimension first
    dtype = torch.promote_types(x.dtype, torch.float32)  # FFTs need at least float32
    spec = None
    for xc, gc in zip(x.split(chunk), grad.split(chunk)):
        xp = F.pad(xc.to(dtype), tail + (pad,) * 6)
        gp = F.pad(gc.to(dtype), tail + (0, 2 * pad) * 3)
        part = (torch.fft.rfftn(xp, dim=dims) * torch.fft.rfftn(gp, dim=dims).conj()).sum(0)
        spec = part if spec is None else spec.add_(part)
    corr = torch.fft.irfftn(spec, s=[xp.shape[d] for d in dims], dim=[d - 1 for d in dims])
    if channel_dim == 1:  # (C, D, H, W)
        return corr[:, :k, :k, :k].unsqueeze(1)
    return corr[:k, :k, :k].permute(3, 0, 1, 2).unsqueeze(1)  # (D, H, W, C)


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
            grad_w = _depthwise_weight_grad(x, grad, k, channel_dim=1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b


class _DepthwiseConv3dCL(torch.autograd.Function):
    """The same depthwise conv on a channels-last ``(N, D, H, W, C)`` tensor, returning channels-last.

    Used by the packed (visible-voxels-only) execution, whose features live as ``(rows, C)``. Same fast CPU
    backward as :class:`_DepthwiseConv3dCPU`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        pad = weight.shape[-1] // 2
        y = F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=pad, groups=x.shape[-1])
        return y.permute(0, 2, 3, 4, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        pad = k // 2
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = F.conv3d(grad.permute(0, 4, 1, 2, 3), weight.flip(2, 3, 4), padding=pad, groups=x.shape[-1])
            grad_x = gx.permute(0, 2, 3, 4, 1).contiguous()
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(x, grad, k, channel_dim=4).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 1, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv3d_cl(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv`` (a depthwise "same" Conv3d) applied to a channels-last ``(N, D, H, W, C)`` tensor."""
    if x.device.type == "cpu" and x.dtype == conv.weight.dtype:
        return _DepthwiseConv3dCL.apply(x, conv.weight, conv.bias)
    pad = conv.weight.shape[-1] // 2
    y = F.conv3d(x.permute(0, 4, 1, 2, 3), conv.weight, conv.bias, padding=pad, groups=x.shape[-1])
    return y.permute(0, 2, 3, 4, 1)


class _ScatterRows(torch.autograd.Function):
    """``out = zeros(total, C); out[index] = rows``; the backward is a gather (no scatter-add needed)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros(total, rows.shape[1]).index_copy_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    return _ScatterRows.apply(rows, index, total)


def pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 Conv3d applied to ``(rows, C)`` features (same parameters, as a Linear)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def layer_norm_rows(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def downsample_rows(down: Downsample, x: torch.Tensor) -> torch.Tensor:
    """:class:`Downsample` on ``(rows, C)`` features whose consecutive groups of 8 rows are 2x2x2 blocks in C order
    of the kernel (the packed layout of :mod:`.packed`): a Linear on the concatenated 8 rows."""
    conv, norm, act = down
    out, cin = conv.weight.shape[:2]
    w = conv.weight.permute(0, 2, 3, 4, 1).reshape(out, 8 * cin)
    y = F.linear(x.reshape(-1, 8 * cin), w, conv.bias)
    return act(layer_norm_rows(norm, y))


def drop_path_rows(x: torch.Tensor, p: float, training: bool, rows_per_volume: torch.Tensor) -> torch.Tensor:
    """:func:`drop_path` for packed rows: one keep decision per volume, repeated over its rows."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    scale = x.new_empty(rows_per_volume.shape[0]).bernoulli_(keep).div_(keep)
    return x * scale.repeat_interleave(rows_per_volume)[:, None]


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

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm3d(dim, eps=eps)
        self.pw1 = nn.Conv3d(dim, dim, 1)
        self.dw = DepthwiseConv3d(dim, 5)
        self.pw2 = nn.Conv3d(dim, dim, 1)
        self.norm2 = LayerNorm3d(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv3d(dim, hidden, 1), nn.GELU(), nn.Conv3d(hidden, dim, 1))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        y = self.pw1(self.norm1(x))
        if visible is not None:
            y = y * visible
        x = x + drop_path(self.pw2(self.dw(y)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def forward_packed(self, x: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...],
                       rows_per_volume: torch.Tensor) -> torch.Tensor:
        """The same block on the visible voxels only, as ``(rows, C)`` features.

        ``index`` places each row in the flattened channels-last grid ``shape = (N, D, H, W)``; the depthwise conv
        runs on that grid with zeros at masked voxels (exactly ``visible * ...`` of :meth:`forward`), every
        pointwise op runs on the visible rows only. Masked voxels are never computed: nothing reads them.
        """
        c = x.shape[1]
        y = pointwise(self.pw1, layer_norm_rows(self.norm1, x))
        total = shape[0] * shape[1] * shape[2] * shape[3]
        grid = scatter_rows(y, index, total).view(*shape, c)
        y = depthwise_conv3d_cl(grid, self.dw).reshape(total, c).index_select(0, index)
        x = x + drop_path_rows(pointwise(self.pw2, y), self.drop_path, self.training, rows_per_volume)
        h = pointwise(self.mlp[2], self.mlp[1](pointwise(self.mlp[0], layer_norm_rows(self.norm2, x))))
        return x + drop_path_rows(h, self.drop_path, self.training, rows_per_volume)


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

    def forward_packed(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Attention over packed ``(rows, dim)`` tokens: ``runs`` lists consecutive (volumes, tokens per volume)
        groups; each group is one unmasked attention call (no padding, fused kernels)."""
        dim = x.shape[1]
        qkv = self.qkv(x)
        out, start = [], 0
        for n, length in runs:
            seg = qkv[start:start + n * length]
            start += n * length
            if length == 0:
                continue
            seg = seg.reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(seg[0], seg[1], seg[2])
            out.append(o.transpose(1, 2).reshape(n * length, dim))
        if not out:  # every volume fully masked: no rows at all
            return self.proj(x)
        return self.proj(torch.cat(out) if len(out) > 1 else out[0])


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

    def forward_packed(self, x: torch.Tensor, runs: list[tuple[int, int]], tokens_per_volume: torch.Tensor) -> torch.Tensor:
        """The block on packed ``(rows, dim)`` tokens of several volumes (see :meth:`Attention.forward_packed`)."""
        x = x + drop_path_rows(self.attn.forward_packed(self.norm1(x), runs), self.drop_path, self.training, tokens_per_volume)
        return x + drop_path_rows(self.mlp(self.norm2(x)), self.drop_path, self.training, tokens_per_volume)
