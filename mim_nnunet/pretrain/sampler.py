"""The order in which crops are drawn: deterministic, resumable, sharded over DDP ranks.

An epoch is one random crop of every volume (mim_method.md §5). Epoch ``e`` is a permutation of the volumes
seeded by ``(seed, e)``, wrapped around so that every optimizer step of every rank is full, and dealt to the
ranks round-robin. Everything is a function of the optimizer step, so a resumed run only needs the step number
(and the same batch size, accumulation and world size) to continue with exactly the crops it would have seen.
The crop itself is drawn by the dataset from ``(seed, epoch, index)``: :class:`EpochCrops` passes the epoch
along with each index, so DataLoader workers need no shared state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..interrupt import ignore_stop_signals


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them; adjacent inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class CropOrder(Sampler):
    """Infinite stream of ``(epoch, volume index)`` for one rank, starting at optimizer step ``start_step``."""

    def __init__(
        self,
        num_volumes: int,
        batch_size: int,
        accumulate: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_step: int = 0,
    ):
        if num_volumes < 1:
            raise ValueError("CropOrder needs at least one volume")
        self.n, self.world, self.rank, self.seed = num_volumes, world_size, rank, seed
        self.per_step = batch_size * accumulate  # crops per optimizer step on this rank
        self.steps_per_epoch = math.ceil(num_volumes / (self.per_step * world_size))
        self.start_step = start_step

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's volume indices of ``epoch``, ``steps_per_epoch * batch * accumulate`` of them."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        total = self.steps_per_epoch * self.per_step * self.world
        full = perm.repeat(math.ceil(total / self.n))[:total]
        return full[self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, step_in_epoch = divmod(self.start_step, self.steps_per_epoch)
        offset = step_in_epoch * self.per_step
        while True:
            for i in self.epoch_indices(epoch)[offset:]:
                yield epoch, i
            epoch, offset = epoch + 1, 0


class EpochCrops(Dataset):
    """Adapts a crop dataset with ``set_epoch(e)`` + ``[i]`` to keys ``(epoch, i)`` (works inside workers)."""

    def __init__(self, crops: Dataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        self.crops.set_epoch(epoch)
        return self.crops[i]


# ignore_stop_signals, the workers' side of the stop mechanism, lives with the rest of it (mim_nnunet/interrupt.py)
ignore_sigint = ignore_stop_signals  # the former name
