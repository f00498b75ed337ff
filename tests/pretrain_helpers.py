"""Test helpers of the pre-training tests: a stand-in crop dataset (no files) and run options for the tiny preset."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mim_nnunet.pretrain.run import RunOptions
from mim_nnunet.pretrain.sampler import mix_seed


class RandomCrops(Dataset):
    """Smooth random ``(1, c, c, c)`` crops in [0, 1], deterministic from ``(seed, epoch, index)`` (the
    CropDataset contract) -- a stand-in for the data layer in engine tests."""

    def __init__(self, n: int = 4, crop: int = 64, seed: int = 0):
        self.n, self.crop, self.seed, self.epoch = n, crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
        coarse = torch.rand(1, 1, 8, 8, 8, generator=g)
        return torch.nn.functional.interpolate(coarse, size=(self.crop,) * 3, mode="trilinear")[0]


DATA = {
    "spacing": [1.5, 1.5, 1.5],
    "window": [-1000.0, 1000.0],
    "corpus": {"num_cases": 4},
    "inputs": ["<random>"],
}


def tiny_options(**overrides) -> RunOptions:
    base = dict(preset="tiny", batch_size=1, accumulate=1, max_steps=4, lr=1e-3, warmup_steps=1, num_workers=0,
                save_every=1000, log_every=1, progress=False, seed=0)  # fmt: skip
    return RunOptions(**(base | overrides))
