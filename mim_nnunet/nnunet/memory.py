"""Memory model of the segmentation network for the planner's patch/batch choice (a plans decision).

Owns one estimate: bytes needed to train :class:`MiMSegmentationNetwork` on a patch at a batch size. It runs the
network once on the ``meta`` device (shapes only: no memory, no compute) and sums the output sizes of every leaf
module, plus the attention matrices (heads x L^2 per ViT block, what a non-fused attention kernel stores). Those
are the activations autograd keeps for backward; ops outside leaf modules (concatenations, residual adds, the
token reshape) and allocator slack are covered by :data:`ACTIVATION_FACTOR`. Parameters cost four copies
(weights, gradients, two AdamW moments).

Calibration (benchmarks/bench_finetune.py, which reports both): peak RSS of an fp32 CPU training process minus
its RSS before the network was built, batch 2 at 64^3, against this model with factor 1 (context included):
tiny 0.64 GiB measured / 0.85 estimated, small 1.38 / 1.67, base 2.30 / 2.62
(benchmarks/bench_finetune.py, run of 2026-11-28, docs/benchmarks.md). fp32 is conservative for CUDA,
where nnU-Net trains under AMP (half-size conv activations); no GPU was available to calibrate there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.layers import Attention
from ..model.segmentation import MiMSegmentationNetwork

ACTIVATION_FACTOR = 1.0  # measured peak / counted activations: within 15 % on CPU (see module docstring)
BYTES_PER_ELEMENT = 4  # fp32
PARAMETER_COPIES = 4  # weights, grads, AdamW exp_avg, exp_avg_sq
CONTEXT_BYTES = 0.5 * 2**30  # CUDA context / workspace: nnU-Net's target is a whole-GPU figure


def count_activations(network: nn.Module, patch_size: Sequence[int], input_channels: int) -> int:
    """Activation elements of one sample's forward pass (leaf-module outputs + attention matrices)."""
    total = 0

    def numel(out) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel()
        if isinstance(out, (list, tuple)):
            return sum(numel(o) for o in out)
        return 0

    def leaf_hook(module, args, out):
        nonlocal total
        total += numel(out)

    def attention_hook(module: Attention, args, out):
        nonlocal total
        n, length, _ = args[0].shape
        total += n * module.num_heads * length * length

    handles = []
    for m in network.modules():
        if isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention_hook))
        elif not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(leaf_hook))
    try:
        with torch.no_grad():
            network(torch.empty((1, input_channels, *patch_size), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


class MemoryModel:
    """``estimate(patch, batch)`` in bytes for one set of network kwargs (the network is built once, on meta)."""

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int):
        kwargs = {k: v for k, v in arch_kwargs.items() if k != "patch_size"}
        # Built at the smallest valid patch; other patches recompute the sin-cos table, which is shape-only.
        net = MiMSegmentationNetwork(
            input_channels, num_classes, (16, 16, 16), deep_supervision=True, **kwargs
        )
        self.num_parameters = sum(p.numel() for p in net.parameters())
        self.network = net.to("meta").train()
        self.input_channels = input_channels
        self._cache: dict[tuple[int, ...], int] = {}

    @classmethod
    def for_network(cls, network: nn.Module, input_channels: int) -> MemoryModel:
        """The same estimate for another network that takes ``(N, C, *patch)`` input (e.g. the classifier of
        :mod:`mim_nnunet.classify.model`); ``network`` is moved to the meta device."""
        model = cls.__new__(cls)
        model.num_parameters = sum(p.numel() for p in network.parameters())
        model.network = network.to("meta").train()
        model.input_channels = input_channels
        model._cache = {}
        return model

    def activation_elements(self, patch_size: Sequence[int]) -> int:
        key = tuple(int(p) for p in patch_size)
        if key not in self._cache:
            self._cache[key] = count_activations(self.network, key, self.input_channels)
        return self._cache[key]

    def fixed_bytes(self) -> float:
        return PARAMETER_COPIES * BYTES_PER_ELEMENT * self.num_parameters + CONTEXT_BYTES

    def per_sample_bytes(self, patch_size: Sequence[int]) -> float:
        return ACTIVATION_FACTOR * BYTES_PER_ELEMENT * self.activation_elements(patch_size)

    def estimate(self, patch_size: Sequence[int], batch_size: int) -> float:
        return self.fixed_bytes() + batch_size * self.per_sample_bytes(patch_size)
