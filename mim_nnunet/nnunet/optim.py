"""Fine-tuning optimisation: layer-wise LR decay param groups and a warm-up + cosine schedule that honours them.

Owns the recipe's maths (mim_method.md §6: AdamW, warm-up then cosine) and nothing about nnU-Net's loop. Each
param group carries ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``; the encoder's stem is layer 0,
every conv block and ViT block one layer in forward order (a stage's down-sampling conv shares the id of the
stage's first block; the token down-sampling and projection that of the first ViT block), the encoder's final
norm, the decoder and the heads the top layer (scale 1). nnU-Net's own schedulers write one lr into every group,
which would silently undo the decay; :class:`WarmupCosineLR` sets ``lr = base_lr * f(t) * lr_scale`` per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def encoder_layer_id(name: str, conv_depths: Sequence[int], depth: int) -> int:
    """Layer id of an encoder parameter name (relative to the encoder, e.g. ``stages.1.0.dw.weight``)."""
    top = sum(conv_depths) + depth + 1
    parts = name.split(".")
    if parts[0] == "pos_embed":
        return 0
    if parts[0] == "downsamples":
        i = int(parts[1])
        return 0 if i == 0 else 1 + sum(conv_depths[:i])
    if parts[0] == "stages":
        i, j = int(parts[1]), int(parts[2])
        return 1 + sum(conv_depths[:i]) + j
    if parts[0] in ("token_downsample", "token_proj"):
        return 1 + sum(conv_depths)
    if parts[0] == "blocks":
        return 1 + sum(conv_depths) + int(parts[1])
    return top  # final norm


def param_groups_layer_decay(
    network: nn.Module, weight_decay: float, layer_decay: float, conv_depths: Sequence[int], depth: int
) -> list[dict]:
    """AdamW param groups: one per (layer, decay/no-decay), top layer first (so group 0 has scale 1).

    No weight decay on biases and normalisation weights (every parameter with ndim <= 1).
    """
    top = sum(conv_depths) + depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("_orig_mod.").removeprefix("module.")  # torch.compile / DDP wrappers
        layer = (
            encoder_layer_id(name[len("encoder.") :], conv_depths, depth)
            if name.startswith("encoder.")
            else top
        )
        decay = p.ndim > 1
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (top - layer),
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def scale_encoder_groups(groups: list[dict], scale: float) -> list[dict]:
    """Multiply the ``lr_scale`` of every encoder group (layer id below the top, i.e. not the decoder) by ``scale``."""
    top = max(g["layer_id"] for g in groups)
    for g in groups:
        if g["layer_id"] < top:
            g["lr_scale"] *= scale
    return groups


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to ``base_lr`` over ``warmup_epochs``, then cosine to 0 at ``total_epochs``.

    ``step(epoch)`` takes a float epoch (fractions for per-iteration updates); every group gets
    ``base_lr * f(epoch) * group['lr_scale']``.
    """

    def __init__(self, optimizer, base_lr: float, total_epochs: float, warmup_epochs: float):
        self.base_lr = base_lr
        self.total_epochs = float(total_epochs)
        self.warmup_epochs = float(warmup_epochs)
        super().__init__(optimizer)

    def factor(self, epoch: float) -> float:
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            return max(epoch, 1e-3) / self.warmup_epochs  # never exactly 0: the first step must move
        span = max(self.total_epochs - self.warmup_epochs, 1e-8)
        t = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def step(self, epoch: float | None = None) -> None:
        if epoch is None:
            epoch = self.last_epoch + 1
        self.last_epoch = epoch
        f = self.factor(float(epoch))
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * f * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
