"""Seeds that fix every batch of a fine-tuning run (the evidence study: two arms at one seed see the same batches).

nnU-Net seeds nothing: its training and validation batches come from ``NonDetMultiThreadedAugmenter`` workers
that draw from unseeded generators and hand over whichever batch is ready first, so two runs at one seed see
different batches. With a run seed, ``SeededBatchesMixin`` makes the whole run a function of that seed:

- python, numpy and torch are seeded before the network is built (initialisation, and patch sampling and
  augmentation when ``nnUNet_n_proc_DA=0`` runs them in the main process);
- every augmentation worker seeds python, numpy and torch from the run's seed, its stream (training or
  validation) and its index (``worker_seeds``), before its first draw; batchgenerators' ``MultiThreadedAugmenter``
  (the deterministic one: worker i delivers batches i, i + n, ...) replaces the non-deterministic augmenter;
- the worker count is nnU-Net's (``nnUNet_n_proc_DA`` or its host table), so a seeded run costs what an unseeded
  one does.

Without a seed nothing here changes nnU-Net's behaviour. Bit-identical on CPU; on CUDA, cuDNN's autotuner and
atomic adds can still make two runs differ in the last bits (the batches are still the same).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: recorded in the study's run results: runs with another (or no) value are never pooled with these
SEEDING = "every-batch-v1"
#: the worker streams: the same worker index draws different numbers for training and validation
TRAIN_STREAM, VAL_STREAM = 0, 1
N_PROC_DA_ENV = "nnUNet_n_proc_DA"


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_seeds(seed: int, stream: int, n: int) -> list[int]:
    """``n`` independent 32-bit seeds for the workers of one stream, derived from the run's seed (numpy's
    SeedSequence: distinct for every (seed, stream) and every worker index)."""
    return [int(s) for s in np.random.SeedSequence([seed, stream]).generate_state(n)]


class SeededWorkerLoader:
    """A batchgenerators data loader whose every worker seeds itself before drawing.

    ``MultiThreadedAugmenter`` calls ``set_thread_id(i)`` inside worker ``i`` before the worker's first batch; here
    that call seeds python, numpy and torch with ``seeds[i]`` (batchgenerators seeds only numpy, and only from
    the ``seeds`` argument; the transforms of batchgeneratorsv2 also draw from torch). Everything else is the
    wrapped loader's.
    """

    def __init__(self, loader, seeds: list[int]):
        self.loader = loader
        self.seeds = list(seeds)

    def set_thread_id(self, thread_id: int) -> None:
        # One intra-op thread, as nnU-Net's own workers: a forked child that inherited the parent's OpenMP pool
        # deadlocks in its first parallel torch op (seen: the training workers hung after the first batch).
        torch.set_num_threads(1)
        seed_everything(self.seeds[thread_id])
        self.loader.set_thread_id(thread_id)

    # The augmenter resets this flag on (re)start; it belongs to the wrapped loader.
    @property
    def was_initialized(self) -> bool:
        return self.loader.was_initialized

    @was_initialized.setter
    def was_initialized(self, value: bool) -> None:
        self.loader.was_initialized = value

    def __iter__(self) -> SeededWorkerLoader:
        return self

    def __next__(self):
        return next(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def seeded_augmenters(train_loader, val_loader, seed: int, n_train: int, n_val: int, pin_memory: bool):
    """Deterministic multi-process augmenters over nnU-Net's two loaders, each worker seeded from ``seed``."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    def augmenter(loader, stream: int, n: int) -> MultiThreadedAugmenter:
        return MultiThreadedAugmenter(
            SeededWorkerLoader(loader, worker_seeds(seed, stream, n)), None, n,
            num_cached_per_queue=2, seeds=None, pin_memory=pin_memory, wait_time=0.002,
        )  # fmt: skip

    return augmenter(train_loader, TRAIN_STREAM, n_train), augmenter(val_loader, VAL_STREAM, n_val)


class SeededBatchesMixin:
    """For nnU-Net trainers: with ``self.run_seed`` set (an int), every batch is a function of that seed.

    ``run_seed`` is None by default: then ``get_dataloaders`` is nnU-Net's own, unchanged. A trainer that sets it
    calls ``seed_everything(run_seed)`` in its ``__init__`` (before nnU-Net builds the network).
    """

    run_seed: int | None = None

    def get_dataloaders(self):
        if self.run_seed is None:
            return super().get_dataloaders()
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        n = get_allowed_n_proc_DA()
        # nnU-Net builds its loaders and transforms as it always does; with 0 workers it wraps them in
        # single-threaded augmenters, which start no process and draw from this process's seeded generators.
        with _environ(N_PROC_DA_ENV, "0"):
            train, val = super().get_dataloaders()
        if n == 0:
            return train, val
        train, val = seeded_augmenters(
            train.data_loader, val.data_loader, self.run_seed, n, max(1, n // 2), self.device.type == "cuda"
        )
        next(train), next(val)  # start the workers now, as nnU-Net does
        self.print_to_log_file(
            f"MiM: seeded batches (seed {self.run_seed}, {n} training and {max(1, n // 2)} validation "
            f"augmentation workers, {SEEDING})"
        )
        return train, val
