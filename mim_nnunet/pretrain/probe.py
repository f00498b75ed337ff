"""A linear probe during pre-training: do the encoder's representations get better, without fine-tuning?

Every N optimizer steps, a multinomial logistic regression is fitted on frozen, unmasked encoder features at a few
thousand sampled voxels of K labeled cases and scored (mean foreground Dice) on voxels of other, held-out cases.

- Cases: an nnU-Net raw dataset (id, name or folder, ``imagesTr`` + ``labelsTr``), the first K sorted cases to fit
  and the next K (at least one) to score. Preprocessed like pre-training (:mod:`mim_nnunet.data.preprocess`: read as
  nnU-Net reads, crop to the body, resample to the run's spacing with nnU-Net's resampling, HU window to [0, 1];
  labels with nnU-Net's segmentation resampling), then one crop of the pre-training crop size (2S) per case around
  the foreground's centre. Done once, when the probe is created.
- Features: the encoder's four maps (stages 1-3 and the transformer tokens, as fine-tuning sees them), trilinearly
  sampled at each chosen voxel and concatenated (tiny: 104, base: 720 values per voxel), standardised with the
  fitting set's statistics.
- Voxels: fixed once (a seeded generator), so every probe of a run scores the same voxels. Fitting voxels are half
  uniform over the crop, half balanced over the labels present (small organs get examples); scoring voxels are
  uniform over the crop, so Dice on them estimates Dice on the crop.
- Classifier: softmax regression with a small L2 penalty, full-batch L-BFGS in float32 (a second at most on CPU).

Only rank 0 probes; training randomness is untouched (the probe uses its own generator, and the training loop
re-seeds the global RNG every step).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nnunetv2.preprocessing.resampling.default_resampling import (
    resample_data_or_seg_to_shape,
)

from ..data.preprocess import (
    PreprocessSettings,
    SkipCase,
    body_bbox,
    body_mask,
    read_case,
    window_and_resample,
)
from ..data.sources import CaseSource, _nnunet_dataset_folder

log = logging.getLogger(__name__)

FIT_VOXELS = 2000  # per fitting case
SCORE_VOXELS = 4000  # per held-out case
L2 = 1e-3
LBFGS_ITERS = 50


@dataclass
class ProbeCase:
    case_id: str
    image: torch.Tensor  # (1, C, C, C) in [0, 1], zero (air) padded
    label: torch.Tensor  # (C, C, C) int64, -1 outside the image (padding)


def dataset_cases(spec: str | Path) -> tuple[Path, list[tuple[str, Path, Path]], str]:
    """``(folder, [(case id, image, label)], file ending)`` of an nnU-Net raw dataset given by id, name or folder."""
    folder = Path(spec) if Path(spec).is_dir() else _nnunet_dataset_folder(str(spec))
    if folder is None:
        raise ValueError(f"--probe {spec!r}: not a folder, nor an nnU-Net raw dataset id/name in $nnUNet_raw")
    dj = folder / "dataset.json"
    if not dj.is_file():
        raise ValueError(f"--probe {spec!r}: {dj} not found; expected an nnU-Net raw dataset folder")
    ending = json.loads(dj.read_text()).get("file_ending", ".nii.gz")
    cases = []
    for lab in sorted((folder / "labelsTr").glob(f"*{ending}")):
        cid = lab.name[: -len(ending)]
        img = folder / "imagesTr" / f"{cid}_0000{ending}"
        if img.is_file():
            cases.append((cid, img, lab))
    return folder, cases, ending


def preprocess_labeled(
    image: Path, label: Path, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Image in [0, 1] and label map at the pre-training spacing, both (z, y, x), as pre-training sees images."""
    src = CaseSource(case_id=image.name, path=str(image))
    arr, props = read_case(src, settings)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label))).astype(np.int16)
    if seg.shape != arr.shape:
        raise ValueError(f"{label}: label shape {seg.shape} differs from the image's {arr.shape} ({image})")
    mask, strides = body_mask(arr, settings)
    box = tuple(
        slice(lo, hi)
        for lo, hi in body_bbox(mask, strides, arr.shape, props["spacing"], settings.crop_margin_mm)
    )
    arr, seg = arr[box], seg[box]
    img = window_and_resample(arr, props["spacing"], settings)
    lab = resample_data_or_seg_to_shape(
        seg[None], img.shape, props["spacing"], settings.spacing, is_seg=True, order=1, order_z=settings.order_z,
        force_separate_z=None,
    )[0]  # fmt: skip
    return img.astype(np.float32), lab.astype(np.int64)


def crop_around_foreground(
    image: np.ndarray, label: np.ndarray, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size``^3 crop centred on the labels' bounding box (air / -1 padded where the volume is smaller)."""
    fg = np.argwhere(label > 0)
    centre = (fg.min(0) + fg.max(0)) // 2 if len(fg) else np.array(label.shape) // 2
    img = torch.zeros(size, size, size)
    lab = torch.full((size, size, size), -1, dtype=torch.int64)
    src, dst = [], []
    for c, n in zip(centre, label.shape, strict=True):
        start = int(np.clip(c - size // 2, 0, max(0, n - size))) if n >= size else 0
        length = min(size, n)
        off = 0 if n >= size else (size - n) // 2
        src.append(slice(start, start + length))
        dst.append(slice(off, off + length))
    img[tuple(dst)] = torch.from_numpy(image[tuple(src)])
    lab[tuple(dst)] = torch.from_numpy(label[tuple(src)])
    return img[None], lab


def sample_voxels(label: torch.Tensor, n: int, balanced: bool, g: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` voxel indices inside the image (label >= 0): uniform, or half uniform and half class-balanced."""
    inside = (label >= 0).nonzero()
    picks = [inside[torch.randint(len(inside), (n // 2 if balanced else n,), generator=g)]]
    if balanced:
        classes = label[label >= 0].unique()
        per = (n - n // 2) // len(classes)
        for c in classes:
            where = (label == c).nonzero()
            picks.append(where[torch.randint(len(where), (per,), generator=g)])
    return torch.cat(picks)


@torch.no_grad()
def voxel_features(
    encoder: torch.nn.Module, image: torch.Tensor, voxels: torch.Tensor, dtype=None
) -> torch.Tensor:
    """Encoder maps of ``image (1, 1, C, C, C)`` trilinearly sampled at ``voxels (n, 3)`` -> ``(n, sum of dims)``."""
    size = image.shape[-1]
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        maps = encoder(image)
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=False: voxel centres at (v + 0.5) / C * 2 - 1
    grid = ((voxels.flip(-1).float() + 0.5) / size * 2 - 1).to(image.device)[None, None, None]
    feats = [F.grid_sample(m.float(), grid, mode="bilinear", align_corners=False)[0, :, 0, 0].T for m in maps]
    return torch.cat(feats, dim=1).cpu()


@dataclass
class SoftmaxClassifier:
    """A fitted multinomial logistic regression on standardised features: ``classifier(z)`` -> class per row."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return (((z - self.mean) / self.std) @ self.w + self.b).argmax(1)


def _softmax_loss(opt, xs: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float):
    """LBFGS's closure: the regularised cross-entropy, with its gradients."""
    opt.zero_grad()
    loss = F.cross_entropy(xs @ w + b, y) + l2 * (w**2).sum()
    loss.backward()
    return loss


def fit_softmax(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = L2, iters: int = LBFGS_ITERS
) -> SoftmaxClassifier:
    """Multinomial logistic regression on standardised ``x (n, f)``; returns the classifier."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")
    with torch.enable_grad():
        opt.step(partial(_softmax_loss, opt, xs, y, w, b, l2))
    return SoftmaxClassifier(mean, std, w.detach(), b.detach())


def mean_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``truth`` or ``pred`` (NaN if none is)."""
    dices = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        denom = int(p.sum() + t.sum())
        if denom:
            dices.append(2.0 * int((p & t).sum()) / denom)
    return float(np.mean(dices)) if dices else float("nan")


class LinearProbe:
    """Fit on ``fit`` cases, score on ``score`` cases; :meth:`__call__` returns the metrics to log."""

    def __init__(self, fit: list[ProbeCase], score: list[ProbeCase], num_classes: int, seed: int = 0):
        if not fit or not score:
            raise ValueError(f"the probe needs fitting and held-out cases, got {len(fit)} and {len(score)}")
        self.fit_cases, self.score_cases, self.num_classes = fit, score, num_classes
        g = torch.Generator().manual_seed(seed)
        self.fit_voxels = [sample_voxels(c.label, FIT_VOXELS, True, g) for c in fit]
        self.score_voxels = [sample_voxels(c.label, SCORE_VOXELS, False, g) for c in score]

    @classmethod
    def from_dataset(
        cls, spec: str | Path, cases: int, crop: int, spacing, window, seed: int = 0
    ) -> LinearProbe:
        """The first ``cases`` labeled cases of the dataset to fit, the next ``cases`` (at least 1) to score."""
        folder, found, _ = dataset_cases(spec)
        if len(found) < 2:
            raise ValueError(
                f"--probe {spec!r}: {folder} has {len(found)} labeled cases in labelsTr, need at least 2"
            )
        n_fit = min(cases, len(found) - 1)
        settings = PreprocessSettings(spacing=tuple(spacing), window=tuple(window))
        labels = json.loads((folder / "dataset.json").read_text()).get("labels", {})
        num_classes = max(int(v) for v in labels.values()) + 1 if labels else 2
        loaded = []
        for cid, img, lab in found[: n_fit + min(cases, len(found) - n_fit)]:
            try:
                image, label = preprocess_labeled(img, lab, settings)
            except SkipCase as e:
                raise ValueError(f"--probe: {img}: {e}") from None
            loaded.append(ProbeCase(cid, *crop_around_foreground(image, label, crop)))
        log.info("probe: %d cases to fit, %d held out, from %s (crops %d^3, %d classes)",
                 n_fit, len(loaded) - n_fit, folder, crop, num_classes)  # fmt: skip
        return cls(loaded[:n_fit], loaded[n_fit:], num_classes, seed)

    def _features(self, encoder, cases, voxels, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = [
            voxel_features(encoder, c.image[None].to(device), v, dtype)
            for c, v in zip(cases, voxels, strict=True)
        ]
        y = [c.label[tuple(v.T)] for c, v in zip(cases, voxels, strict=True)]
        return torch.cat(x), torch.cat(y)

    def __call__(
        self, encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None
    ) -> dict:
        t0 = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            x_fit, y_fit = self._features(encoder, self.fit_cases, self.fit_voxels, device, dtype)
            x_score, y_score = self._features(encoder, self.score_cases, self.score_voxels, device, dtype)
        finally:
            encoder.train(was_training)
        predict = fit_softmax(x_fit, y_fit, self.num_classes)
        dice = mean_dice(predict(x_score), y_score, self.num_classes)
        return {"probe_dice": dice, "probe_seconds": time.perf_counter() - t0}
