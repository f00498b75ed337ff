"""Test helpers of the classification tests: tiny labelled volumes, a dataset in the classification layout, a
tiny MiM checkpoint. Everything is generated; nothing is committed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mim_nnunet import build_pretraining_model
from mim_nnunet.checkpoint import CheckpointMetadata, save_checkpoint

# Class -> HU of a sphere in the middle of a soft-tissue box (air around it): easy to tell apart.
SPHERE_HU = {"bright": 400.0, "dark": -600.0, "none": None}
FLIP = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # RAS-like direction: the reader must reorient it
PERMUTED = (0, 1.0, 0, 1.0, 0, 0, 0, 0, 1.0)  # x and y swapped


def volume(cls: str, rng: np.random.Generator, shape=(28, 28, 28), spacing=(1.5, 1.5, 1.5)) -> np.ndarray:
    """(z, y, x) HU: air, a soft-tissue box, and (by class) a sphere of radius ~7 mm, with noise."""
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    arr = np.full(shape, -1000.0)
    half = [0.35 * n * s for n, s in zip(shape, spacing)]
    arr[(abs(z) < half[0]) & (abs(y) < half[1]) & (abs(x) < half[2])] = 40.0
    if SPHERE_HU[cls] is not None:
        c = rng.uniform(-2, 2, 3)
        arr[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.uniform(6, 8) ** 2] = SPHERE_HU[cls]
    return arr + rng.normal(0, 20, shape)


def write_image(path: Path, arr: np.ndarray, spacing_zyx=(1.5, 1.5, 1.5), direction=None, dtype=np.int16) -> None:
    image = sitk.GetImageFromArray(arr.astype(dtype))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, per_class: dict[str, int] | None = None, test_per_class: int = 0, seed: int = 0,
                 varied: bool = True) -> Path:  # fmt: skip
    """A classification dataset: ``per_class`` training cases of each class (default 4 of bright/dark/none),
    some flipped, permuted, int32/float32, anisotropic or larger than the input when ``varied``."""
    per_class = per_class or {"bright": 4, "dark": 4, "none": 4}
    classes = list(per_class)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": sum(per_class.values()),
        "file_ending": ".nii.gz", "classes": classes,
    }))  # fmt: skip
    for split, counts in (("Tr", per_class), ("Ts", dict.fromkeys(classes, test_per_class))):
        rows = ["case,class"]
        n = 0
        for cls, k in counts.items():
            for _ in range(k):
                case = f"case{split}_{n:03d}"
                kind = n % 5 if varied else 0
                shape, spacing = [(28, 28, 28), (14, 28, 28), (40, 44, 40), (28, 28, 28), (28, 28, 28)][kind], (
                    [(1.5, 1.5, 1.5), (3.0, 1.5, 1.5), (1.5, 1.5, 1.5), (1.5, 1.5, 1.5), (1.5, 1.5, 1.5)][kind])
                direction = [None, None, None, FLIP, PERMUTED][kind]
                dtype = [np.int16, np.float32, np.int32, np.int16, np.int16][kind]
                write_image(root / f"images{split}" / f"{case}_0000.nii.gz", volume(cls, rng, shape, spacing), spacing,
                            direction, dtype)  # fmt: skip
                rows.append(f"{case},{cls}")
                n += 1
        if n:
            (root / f"classes{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def make_checkpoint(path: Path, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A tiny MiM checkpoint (random weights: pre-training is not what these tests check)."""
    torch.manual_seed(seed)
    m = build_pretraining_model("tiny")
    md = CheckpointMetadata(preset="tiny", config=m.config.to_dict(), spacing=[1.5] * 3,
                            intensity_window=[-1000.0, 1000.0], input_size=m.config.input_size,
                            crop_size=2 * m.config.input_size)  # fmt: skip
    sha = save_checkpoint(path, m.state_dict(), md)
    return m, sha
