"""The case-level classifier: the MiM hybrid encoder and the authors' classification head (pure torch).

The encoder is :class:`~mim_nnunet.model.encoder.HybridEncoder`, embedded unchanged under ``encoder`` so that a
MiM checkpoint loads through the segmentation path (:func:`mim_nnunet.nnunet.weights.load_pretrained_encoder`:
the same verification, architecture check and position-table adaptation). The head, as in the authors'
classification fine-tuning (and MAE's global-pool variant): the last stage's tokens averaged, a LayerNorm, one
Linear. The pre-training final ``norm`` is left out (the head's own LayerNorm replaces it) and frozen, so that DDP
sees no parameter without a gradient. ``pooling="attention"`` replaces the mean by a learned attention pooling: one
score per token (a Linear to 1), softmax over the tokens, the weighted mean.

Any input whose axes are multiples of 16 works; the position table is built for ``input_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.encoder import HybridEncoder

POOLINGS = ("mean", "attention")


class AttentionPool(nn.Module):
    """Softmax-weighted mean of ``(N, L, D)`` tokens, the weights from a learned score per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(tokens).float(), dim=1).to(tokens.dtype)
        return (weights * tokens).sum(dim=1)


class MiMClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_size: Sequence[int],
        in_channels: int = 1,
        dims: Sequence[int] = (48, 96, 192, 384),
        conv_depths: Sequence[int] = (2, 2, 2),
        depth: int = 11,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        conv_ln_eps: float = 1e-6,
        pooling: str = "mean",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = HybridEncoder(
            in_channels=in_channels, dims=tuple(dims), conv_depths=tuple(conv_depths), depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            input_size=tuple(int(s) for s in input_size), conv_ln_eps=conv_ln_eps,
            grad_checkpointing=grad_checkpointing,
        )  # fmt: skip
        self.encoder.norm.requires_grad_(False)  # not used by the head (see the module docstring)
        width = dims[3]
        self.pool = AttentionPool(width) if pooling == "attention" else None
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head init: starts near uniform
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, normed ``(N, D)`` case feature."""
        _, tokens = self.encoder.forward_conv(x)
        tokens = self.encoder.forward_blocks(tokens)
        pooled = tokens.mean(dim=1) if self.pool is None else self.pool(tokens)
        return self.fc_norm(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of ``(N, C, D, H, W)`` input."""
        return self.head(self.features(x))

    def freeze_encoder(self) -> None:
        """The linear probe: the encoder's weights stay as loaded (no gradients, eval mode kept by :meth:`train`)."""
        self.encoder.requires_grad_(False)
        self._frozen = True

    def train(self, mode: bool = True) -> MiMClassifier:
        super().train(mode)
        if getattr(self, "_frozen", False):
            self.encoder.eval()  # no drop-path in a frozen encoder
        return self
