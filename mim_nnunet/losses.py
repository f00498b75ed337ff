"""Losses (mim_method.md §2, §4): norm-pix reconstruction on masked tokens, and cross-level alignment, with the
no-gradient collapse signal of the alignment (:func:`collapse_signal`; why and how to read it: the docstring of
:mod:`mim_nnunet.pretrain.monitor`).

Pure torch; the parent/child pairing (which features are compared) is the model's business, here only maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN = 16


def patchify(volumes: torch.Tensor, patch: int = TOKEN) -> torch.Tensor:
    """``(M, C, D, H, W)`` -> ``(M, L, patch^3 * C)``, tokens in C order, voxels in (z, y, x, c) order."""
    m, c, d, h, w = volumes.shape
    gd, gh, gw = d // patch, h // patch, w // patch
    x = volumes.reshape(m, c, gd, patch, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(m, gd * gh * gw, patch**3 * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], channels: int = 1, patch: int = TOKEN) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    m = tokens.shape[0]
    gd, gh, gw = grid
    x = tokens.reshape(m, gd, gh, gw, patch, patch, patch, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(m, channels, gd * patch, gh * patch, gw * patch)


def reconstruction_loss(
    pred: torch.Tensor, volumes: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Per-token MSE between ``pred (M, L, P)`` and the patchified target, averaged over masked tokens only.

    With ``norm_pix`` each target patch is normalised by its own mean and variance (MAE's norm-pix loss).
    """
    target = patchify(volumes).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_token = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def alignment_loss(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(child, parent)``, averaged over the pairs."""
    return (2.0 - 2.0 * F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()


@torch.no_grad()
def collapse_signal(
    child: torch.Tensor, parent: torch.Tensor, crop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``child``, ``parent``: head outputs ``(M, D)`` of the M aligned pairs; ``crop``: ``(M,)`` crop index of each.

    Returns ``(unrelated cosine, normalised std)`` as 0-d float tensors (how to read them:
    :mod:`mim_nnunet.pretrain.monitor`).
    """
    c = F.normalize(child.detach().float(), dim=-1)
    p = F.normalize(parent.detach().float(), dim=-1)
    m = c.shape[0]
    unrelated = crop[:, None] != crop[None, :]
    if not bool(unrelated.any()):  # one crop in the batch: the non-matching pairs of that crop
        unrelated = ~torch.eye(m, dtype=torch.bool, device=c.device)
    cos = c @ p.T
    unrelated_cos = cos[unrelated].mean() if bool(unrelated.any()) else cos.new_tensor(float("nan"))
    std = p.std(dim=0).mean() * p.shape[1] ** 0.5 if m > 1 else p.new_tensor(float("nan"))
    return unrelated_cos, std
