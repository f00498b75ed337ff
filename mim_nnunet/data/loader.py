"""Random crops of the preprocessed cache: the pre-training samples (mim_method.md §5: "padded to at least the
crop size, one random crop per volume per epoch").

Only the crop region is decompressed (blosc2 NDArray slicing touches only the blocks it needs), so a crop costs
milliseconds. The draw of case ``i`` in epoch ``e`` uses a generator seeded from ``(seed, e, i)``: the sequence is
deterministic, independent of worker count and order, and a resumed run continues it exactly.

With a ``torch.utils.data.DataLoader`` call :meth:`CropDataset.set_epoch` before each epoch and keep
``persistent_workers=False`` (workers copy the dataset, and its epoch, when an epoch's iteration starts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cache import cached_cases, case_paths, open_volume


def random_crop_box(
    shape, crop: int, rng: np.random.Generator
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Source and destination slices of a random ``crop``^3 window. An axis shorter than ``crop`` is read whole
    and placed at a random offset in the (zero = air padded) output."""
    src, dst = [], []
    for n in shape:
        if n >= crop:
            start = int(rng.integers(0, n - crop + 1))
            src.append(slice(start, start + crop))
            dst.append(slice(0, crop))
        else:
            off = int(rng.integers(0, crop - n + 1))
            src.append(slice(0, n))
            dst.append(slice(off, off + n))
    return tuple(src), tuple(dst)


class CropDataset(torch.utils.data.Dataset):
    """One random ``(1, crop, crop, crop)`` float32 crop in [0, 1] per cached case (0 = the window's low end,
    air at the default window)."""

    def __init__(self, cache_dir: str | Path, crop_size: int, seed: int = 0):
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.cache_dir = Path(cache_dir)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.epoch = 0
        metas = cached_cases(self.cache_dir)
        if not metas:
            raise RuntimeError(f"{self.cache_dir}: the cache holds no case")
        self.case_ids = [m["case_id"] for m in metas]
        self.shapes = [tuple(m["shape"]) for m in metas]
        self.levels = [float(m["levels"]) for m in metas]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"case index {i} out of range for {len(self)} cases")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        src, dst = random_crop_box(self.shapes[i], self.crop_size, rng)
        # opened per call (well under a millisecond): nothing unpicklable is held, any worker count works
        region = open_volume(case_paths(self.cache_dir, self.case_ids[i])[0])[src]
        c = self.crop_size
        out = np.zeros((1, c, c, c), dtype=np.float32)
        np.divide(region, np.float32(self.levels[i]), out=out[(0, *dst)], casting="unsafe")
        return torch.from_numpy(out)
