"""Images of a classification case -> the network's input: read, reorient, resample, normalise, pad or crop.

Owns the input pipeline every command shares (training, validation and prediction see a case the same way):

- read with SimpleITK (any format it reads; int16, int32, float: all become float32);
- reorient to one fixed orientation, ``LPS`` (:func:`SimpleITK.DICOMOrient`: the identity direction, array axes
  (z, y, x) = (S, P, L)), so a case stored flipped or with permuted axes reaches the network as every other;
- resample to the planned spacing with nnU-Net's data resampling (via the pre-training's
  :func:`mim_nnunet.data.preprocess.window_and_resample`: order 3, separate z for anisotropic data);
- CT channels: the HU window mapped to [0, 1] (what the encoder was pre-trained on); other channels (only with
  ``--allow-non-ct``): z-scored per case;
- fit to the input size: pad with 0 (the window's low end, air) where the case is smaller, centre-crop where it is
  larger. Cropping, not resizing: resizing would change the millimetres per voxel, and the encoder learned its
  features at the pre-training spacing (the segmentation planner keeps that spacing for the same reason). The
  planned input covers the median case whole, so only the larger cases lose their margins.

Knows arrays and files, no network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.preprocessing.resampling.default_resampling import (
    compute_new_shape,
    resample_data_or_seg_to_shape,
)

from ..data.preprocess import PreprocessSettings, window_and_resample
from .dataset import DatasetError

ORIENTATION = "LPS"
CT = "ct_window"
ZSCORE = "zscore"


def oriented_geometry(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float]) -> tuple[list, list]:
    """Size and spacing in array order (z, y, x) after reorientation to LPS, from header values (no voxels read).

    Reorientation permutes and flips axes: image axis ``argmax |direction[p, :]|`` becomes physical axis ``p``.
    """
    d = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    perm = [int(np.argmax(d[p])) for p in range(3)]
    if sorted(perm) != [0, 1, 2]:  # a 45-degree oblique image: as DICOMOrient, keep the axes
        perm = [0, 1, 2]
    size_xyz = [int(size[a]) for a in perm]
    spacing_xyz = [float(spacing[a]) for a in perm]
    return size_xyz[::-1], spacing_xyz[::-1]


def read_geometry(path: Path) -> tuple[list[int], list[float]]:
    """(size, spacing) in (z, y, x) after reorientation, from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: not readable as an image ({_itk_line(e)})") from None
    if reader.GetDimension() not in (3, 4) or (reader.GetDimension() == 4 and reader.GetSize()[3] != 1):
        raise DatasetError(f"{path}: a {reader.GetDimension()}D image of size {reader.GetSize()}, expected 3D")
    size, spacing, direction = reader.GetSize()[:3], reader.GetSpacing()[:3], reader.GetDirection()
    if len(direction) == 16:
        direction = [direction[r * 4 + c] for r in range(3) for c in range(3)]
    return oriented_geometry(size, spacing, direction)


def _itk_line(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else str(e))[:200]


def read_oriented(path: Path) -> tuple[np.ndarray, list[float]]:
    """float32 array (z, y, x) in LPS orientation and its spacing (z, y, x)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DatasetError(f"{path}: not readable as an image ({_itk_line(e)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{path}: a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                           "components per voxel, expected a 3D scalar image")  # fmt: skip
    image = sitk.DICOMOrient(image, ORIENTATION)
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: {int((~np.isfinite(arr)).sum())} NaN/Inf voxels")
    return arr, [float(s) for s in image.GetSpacing()[::-1]]


def resample_zscore(arr: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """A non-CT channel: z-scored over the case, then resampled like the CT channels."""
    arr = (arr - arr.mean()) / max(float(arr.std()), 1e-8)
    shape = [max(1, int(v)) for v in compute_new_shape(arr.shape, spacing, target)]
    return resample_data_or_seg_to_shape(arr[None], shape, spacing, target, is_seg=False, order=3, order_z=0,
                                         force_separate_z=None)[0]  # fmt: skip


def load_case(
    files: Sequence[str | os.PathLike], spacing: Sequence[float], window: Sequence[float], normalization: Sequence[str]
) -> np.ndarray:
    """``(C, z, y, x)`` float32 at ``spacing``: every channel read, reoriented, resampled and normalised."""
    settings = PreprocessSettings(spacing=tuple(spacing), window=tuple(window))
    channels, shape = [], None
    for path, norm in zip(files, normalization, strict=True):
        arr, sp = read_oriented(Path(path))
        if shape is not None and arr.shape != shape:
            raise DatasetError(f"{path}: shape {arr.shape} differs from the first channel's {shape}")
        shape = arr.shape
        out = window_and_resample(arr, sp, settings) if norm == CT else resample_zscore(arr, sp, spacing)
        channels.append(out.astype(np.float32, copy=False))
    return np.stack(channels)


def pad_to(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(C, *spatial)`` padded with 0 (centred) to at least ``size`` on every axis."""
    pads = [(0, 0)] + [((max(0, s - n)) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(arr.shape[1:], size)]
    return np.pad(arr, pads) if any(p != (0, 0) for p in pads) else arr


def centre_crop(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The centred ``size`` window of ``(C, *spatial)`` (every axis at least ``size``)."""
    starts = [(n - s) // 2 for n, s in zip(arr.shape[1:], size)]
    return arr[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size)))]


def fit_to_input(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Pad where smaller, centre-crop where larger: exactly ``(C, *size)``."""
    return np.ascontiguousarray(centre_crop(pad_to(arr, size), size))
