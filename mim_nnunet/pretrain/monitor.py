"""Collapse watch of the cross-level alignment (mim_method.md §4).

The alignment loss ``2 - 2 cos`` is trained on both heads' outputs; only the parent's *input* is detached. Nothing
in the loss itself stops both heads from mapping every input to one direction: the loss then falls to 0 while
the outputs carry no information about the volume. Two numbers per level pair tell it from honest alignment:

- ``collapse_cos{ij}``: the mean cosine between the child head's output of one pair and the parent head's output
  of an *unrelated* pair (another crop of the batch; with one crop per batch, another parent of the same crop).
  Around 0 for spread-out outputs; towards 1 when everything maps to one direction.
- ``collapse_std{ij}``: the per-dimension standard deviation of the l2-normalised *target* (parent-side) outputs,
  averaged over dimensions and multiplied by sqrt(dim): about 1 for directions spread uniformly over the sphere,
  0 when every target points the same way (the SimSiam paper's measure, rescaled so that it does not depend on
  the width). The target side is the one whose collapse makes the loss meaningless: a child head that predicts
  the mean target for inputs that carry no information about it is the right answer, not a collapse.

Read together with the matched cosine ``1 - align/2``: alignment carries information only while the matched
cosine stays clearly above the unrelated one.

Both are computed without gradient from the tensors the loss already has: no extra forward pass.
The arithmetic lives with the losses (:func:`mim_nnunet.losses.collapse_signal`, pure torch, so the model needs
nothing from the engine); the model decides which features are pairs (:mod:`mim_nnunet.model.mim`) and returns the
values in ``MiMOutput.monitors``; this module keeps the explanation and the name for the engine's callers.
"""

from __future__ import annotations

from ..losses import collapse_signal

__all__ = ["collapse_signal"]
