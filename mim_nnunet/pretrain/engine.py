"""The pre-training loop (MAE's ``engine_pretrain``, counted in optimizer steps rather than epochs).

One optimizer step = ``accumulate`` micro-batches per rank; gradients are synchronised over DDP ranks only on
the last one (``no_sync``). All randomness of a step is a function of ``(seed, rank, step, micro-batch)``: the
Mask-in-Mask draws use their own ``torch.Generator`` and the global RNG (drop path) is re-seeded per step, so a
resumed run repeats exactly what an uninterrupted one would have done. Everything else (logging, checkpoints,
stopping) happens in ``on_step``, which the run (:mod:`.run`) provides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from .distributed import DistInfo, mean_over_ranks
from .sampler import mix_seed

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_steps(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    lr_fn: Callable[[int], float],
    start_step: int,
    end_step: int,
    accumulate: int,
    seed: int,
    dist: DistInfo,
    precision: str = "fp32",
    clip_grad: float | None = None,
    on_step: Callable[[int, dict], bool] = lambda step, metrics: False,
) -> int:
    """Train steps ``start_step .. end_step - 1``; returns the number of steps done when it stops.

    ``on_step(steps_done, metrics)`` is called after every optimizer step and returns True to stop early.
    """
    model.train()
    dtype = AUTOCAST[precision]
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = lr_fn(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(mix_seed(seed, dist.rank, step))
        sums: dict[str, torch.Tensor] = {}
        n_crops = 0
        for micro in range(accumulate):
            crops = next(batches).to(dist.device, non_blocking=True)
            n_crops += crops.shape[0]
            masks_rng = torch.Generator().manual_seed(mix_seed(seed, dist.rank, step, micro))
            # Gradients are all-reduced on the last micro-batch only.
            sync = model.no_sync() if dist.enabled and micro < accumulate - 1 else nullcontext()
            with sync:
                with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
                    out = model(crops, generator=masks_rng)
                scaler.scale(out.loss / accumulate).backward()
            for name, value in {"loss": out.loss, **out.losses, **out.monitors}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / accumulate
        values = mean_over_ranks(torch.stack(list(sums.values())), dist).tolist()
        metrics = dict(zip(sums, values, strict=True))
        if not math.isfinite(metrics["loss"]) and precision != "fp16":  # fp16: the scaler skips such steps
            raise FloatingPointError(
                f"step {step}: the loss is {metrics['loss']} ({metrics}); weights not updated"
            )
        if clip_grad:
            scaler.unscale_(optimizer)
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        if getattr(core, "align_targets", None):  # align_target="ema": the target follows the trained parent head
            core.update_align_targets()
        seconds = time.perf_counter() - t0
        metrics.update(lr=lr, seconds=seconds, crops_per_s=n_crops * dist.world_size / seconds)
        if on_step(step + 1, metrics):
            return step + 1
    return end_step
