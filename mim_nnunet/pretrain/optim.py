"""AdamW with MAE's parameter groups and the warm-up + cosine schedule, in optimizer steps (mim_method.md §5).

No weight decay on norms, biases (every parameter of one dimension), position embeddings and the mask token.
The learning rate follows the linear scaling rule ``lr = blr * effective_batch / 256``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule: ``blr`` is the learning rate per 256 crops."""
    return blr * effective_batch / 256


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then half-cosine to ``min_lr`` at ``total_steps``.

    ``step`` counts optimizer steps from 0; step ``s`` trains with ``lr_at(s)`` (so step 0 of a warm-up is not 0).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
