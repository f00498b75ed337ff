"""Scoring predictions against references: Dice (nnU-Net's counting) and normalised surface Dice (NSD).

Dice uses nnU-Net's own ``region_or_label_to_mask`` / ``compute_tp_fp_fn_tn`` so numbers agree with
``nnUNetv2_evaluate_folder``, including its convention that a label absent from both files scores NaN and is
left out of the means. NSD (Nikolov et al., 2021, "Clinically applicable segmentation of head and neck anatomy
for radiotherapy") is the fraction of both surfaces that lies within ``tolerance`` mm of the other surface:

    NSD = (|{a in S_P : d(a, S_R) <= tol}| + |{r in S_R : d(r, S_P) <= tol}|) / (|S_P| + |S_R|)

Here a surface S is the set of a mask's voxels that have a face neighbour outside the mask (the image border
counts as outside), and d is the Euclidean distance between voxel centres in mm (anisotropic spacing), computed
with scipy's exact distance transform. No PyPI package with a maintained, small NSD implementation exists
(DeepMind's surface-distance is not published there; MONAI would pull a framework in for one function), so the
few lines live here and are tested against closed-form answers in tests/test_submit_nsd.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from scipy import ndimage

from .profiles import IMAGE_ENDINGS
from .validate import check_geometry


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (outside the array counts as outside)."""
    mask = mask.astype(bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Distances between the two surfaces do not depend on voxels outside both masks; one voxel of margin keeps
    # the crop border from turning interior voxels into surface.
    where = np.argwhere(ref | pred)
    lo = np.maximum(where.min(0) - 1, 0)
    hi = np.minimum(where.max(0) + 2, ref.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return ref[sl], pred[sl]


def normalized_surface_dice(ref: np.ndarray, pred: np.ndarray, spacing, tolerance_mm: float) -> float:
    """NSD of two boolean masks (array axis order, ``spacing`` in the same order). NaN if both are empty."""
    ref, pred = ref.astype(bool), pred.astype(bool)
    if ref.shape != pred.shape:
        raise ValueError(f"shape {pred.shape} of the prediction != reference {ref.shape}")
    has_ref, has_pred = ref.any(), pred.any()
    if not has_ref and not has_pred:
        return math.nan
    if not has_ref or not has_pred:
        return 0.0
    ref, pred = _crop_to_union(ref, pred)
    s_ref, s_pred = surface(ref), surface(pred)
    # distance_transform_edt measures to the nearest zero: zeros at the other mask's surface voxels.
    d_to_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    close = np.count_nonzero(d_to_ref[s_pred] <= tolerance_mm) + np.count_nonzero(
        d_to_pred[s_ref] <= tolerance_mm
    )
    return float(close / (np.count_nonzero(s_ref) + np.count_nonzero(s_pred)))


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """nnU-Net's Dice: 2TP / (2TP + FP + FN), NaN if the label is in neither mask."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref.astype(bool), pred.astype(bool))
    return math.nan if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def score_case(ref_seg: np.ndarray, pred_seg: np.ndarray, spacing, labels, tolerance_mm: float) -> dict:
    """{label: {"Dice": .., "NSD": ..}} for one case (arrays in the same axis order as ``spacing``)."""
    out = {}
    for label in labels:
        r = region_or_label_to_mask(ref_seg, label)
        p = region_or_label_to_mask(pred_seg, label)
        out[int(label)] = {"Dice": dice(r, p), "NSD": normalized_surface_dice(r, p, spacing, tolerance_mm)}
    return out


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    tolerance_mm: float,
    labels: list[int] | None = None,
    allow_missing: bool = False,
) -> dict:
    """Score every reference file that has a prediction of the same relative path.

    ``labels`` defaults to every non-zero value found in the references. A reference without prediction is an
    error unless ``allow_missing`` (then it is listed and left out).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs = sorted(p for p in ref_dir.rglob("*") if p.is_file() and p.name.endswith(IMAGE_ENDINGS))
    if not refs:
        raise FileNotFoundError(f"no reference images ({', '.join(IMAGE_ENDINGS)}) under {ref_dir}")
    missing = [
        r.relative_to(ref_dir).as_posix() for r in refs if not (pred_dir / r.relative_to(ref_dir)).is_file()
    ]
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {missing}"
        )
    refs = [r for r in refs if r.relative_to(ref_dir).as_posix() not in missing]
    loaded = []
    for r in refs:
        rel = r.relative_to(ref_dir).as_posix()
        ref_arr, ref_img = _read(r)
        pred_arr, pred_img = _read(pred_dir / rel)
        mismatch = check_geometry(pred_img, ref_img)
        if mismatch:
            raise ValueError(f"{rel}: prediction does not lie on the reference grid: " + "; ".join(mismatch))
        loaded.append((rel, ref_arr, pred_arr, ref_img.GetSpacing()[::-1]))
    if labels is None:
        labels = sorted({int(v) for _, ref_arr, _, _ in loaded for v in np.unique(ref_arr)} - {0})
    per_case = []
    for rel, ref_arr, pred_arr, spacing in loaded:
        per_case.append(
            {"case": rel, "metrics": score_case(ref_arr, pred_arr, spacing, labels, tolerance_mm)}
        )
    mean = {
        label: {m: _nanmean([c["metrics"][label][m] for c in per_case]) for m in ("Dice", "NSD")}
        for label in labels
    }
    foreground_mean = {m: _nanmean([mean[label][m] for label in labels]) for m in ("Dice", "NSD")}
    return {
        "tolerance_mm": tolerance_mm,
        "labels": list(labels),
        "n_cases": len(per_case),
        "missing": missing,
        "per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
    }


def format_table(result: dict) -> str:
    """A plain-text table of the per-label means and the foreground mean."""
    tol = result["tolerance_mm"]
    rows = [f"{'label':>8} {'Dice':>8} {f'NSD@{tol:g}mm':>12}"]
    for label, m in result["mean"].items():
        rows.append(f"{label:>8} {m['Dice']:>8.4f} {m['NSD']:>12.4f}")
    fm = result["foreground_mean"]
    rows.append(f"{'mean':>8} {fm['Dice']:>8.4f} {fm['NSD']:>12.4f}")
    rows.append(
        f"({result['n_cases']} cases" + (f", {len(result['missing'])} missing)" if result["missing"] else ")")
    )
    return "\n".join(rows)


def save_result(result: dict, path: str | Path) -> None:
    """JSON with NaN written as null (JSON has no NaN)."""

    def fix(o):
        if isinstance(o, float) and math.isnan(o):
            return None
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, list):
            return [fix(v) for v in o]
        return o

    Path(path).write_text(json.dumps(fix(result), indent=2))
