"""Training batches of a classification run: the preprocessed cases, nnU-Net's augmentation, a seeded order.

Owns what a training batch is. Cases are preprocessed once (:mod:`.images`) into ``RUN/preprocessed/CASE.npy``
(atomic writes: a kill leaves no half file). Every epoch visits every training case once, in an order drawn from
``(seed, epoch)``; under DDP rank ``r`` takes every ``world``-th case of it. Each sample is padded to the input
size and augmented with batchgeneratorsv2 as nnU-Net's ``get_training_transforms`` does for 3D data (spatial:
rotation up to 30 degrees and scaling 0.7-1.4 with a random crop of the input size; then Gaussian noise and blur,
brightness, contrast, low resolution, two gamma transforms, mirroring), with every random generator seeded from
``(seed, epoch, position)`` first: a batch is a function of the seed, whatever the worker count, and a run
continued mid-epoch draws the same batches as one never stopped. Training and the study that pairs arms by seed
rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from torch.utils.data import Dataset
from tqdm import tqdm

from ..atomic import atomic_write, atomic_write_json
from ..interrupt import ignore_stop_signals
from ..nnunet.seeding import seed_everything
from ..pretrain.sampler import mix_seed
from .images import fit_to_input, load_case, pad_to

PREPROCESSING = "preprocessing.json"  # inside RUN/preprocessed: the settings its arrays were made with
PREPROCESSING_FORMAT = 1
ROTATION = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)  # nnU-Net's 3D rotation range


def training_transforms(input_size: Sequence[int]) -> ComposeTransforms:
    """nnU-Net's 3D training augmentation (its probabilities and ranges) on images without a segmentation."""
    size = tuple(int(s) for s in input_size)
    return ComposeTransforms([
        SpatialTransform(size, patch_center_dist_from_border=[s // 2 for s in size], random_crop=True,
                         p_elastic_deform=0, p_rotation=0.2, rotation=ROTATION, p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5), apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])  # fmt: skip


def _write_npy(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, arr)


def preprocess_cases(
    images: dict[str, list[Path]], cases: Sequence[str], folder: Path, plan, progress: bool = True
) -> None:
    """``folder/CASE.npy`` (float16, the planned spacing and normalisation) for every case not there yet. The
    folder records what its arrays were made with; arrays made otherwise (a replaced run) are removed first."""
    settings = {"spacing": plan.spacing, "window": plan.window, "normalization": plan.normalization,
                "format": PREPROCESSING_FORMAT}  # fmt: skip
    record = folder / PREPROCESSING
    if folder.is_dir() and (not record.is_file() or json.loads(record.read_text()) != settings):
        for old in folder.glob("*.npy"):
            old.unlink()
    atomic_write_json(record, settings)
    todo = [c for c in cases if not (folder / f"{c}.npy").is_file()]
    for case in tqdm(todo, desc="preprocessing", unit="case", disable=not progress or not todo):
        arr = load_case(images[case], plan.spacing, plan.window, plan.normalization).astype(np.float16)
        atomic_write(folder / f"{case}.npy", lambda tmp, a=arr: _write_npy(tmp, a))


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, int]]:
    """This rank's ``(epoch, position, case index)`` keys of one epoch (the position seeds the augmentation).

    Under DDP the order is extended by its first cases to a multiple of ``world`` (as torch's
    ``DistributedSampler`` does), so every rank runs the same number of batches."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    total = -(-n // world) * world
    perm = np.concatenate([perm, perm[: total - n]])
    return [(epoch, pos, int(perm[pos])) for pos in range(rank, total, world)]


class TrainingCases(Dataset):
    """Items by key ``(epoch, position, case index)``: the augmented ``(C, *input_size)`` image and its class."""

    def __init__(self, folder: Path, cases: Sequence[str], labels: Sequence[int], input_size: Sequence[int], seed: int):
        self.folder, self.cases, self.labels = Path(folder), list(cases), list(labels)
        self.input_size, self.seed = [int(s) for s in input_size], seed
        self.transforms = training_transforms(self.input_size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        epoch, position, i = key
        arr = pad_to(np.load(self.folder / f"{self.cases[i]}.npy").astype(np.float32), self.input_size)
        seed_everything(mix_seed(self.seed, epoch, position) % 2**32)
        image = self.transforms(image=torch.from_numpy(np.ascontiguousarray(arr)))["image"]
        return image.float(), self.labels[i]


def validation_input(folder: Path, case: str, input_size: Sequence[int]) -> torch.Tensor:
    """A preprocessed case as prediction sees it: padded or centre-cropped to the input size, no augmentation."""
    return torch.from_numpy(fit_to_input(np.load(folder / f"{case}.npy").astype(np.float32), input_size))


def worker_init(worker_id: int) -> None:
    """DataLoader workers: leave SIGINT/SIGTERM to the main process; one intra-op thread (forked OpenMP pools
    deadlock, and the workers are many)."""
    ignore_stop_signals(worker_id)
    torch.set_num_threads(1)
