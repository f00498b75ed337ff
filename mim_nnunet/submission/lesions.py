"""Lesion-wise scores of one target in one case: lesion counts, detection sensitivity, false positives and
lesion-wise Dice.

Why: a Dice over the whole tumour mask is dominated by the largest lesion, so a missed 5 mm metastasis costs
almost nothing in it, whereas clinical tumour work judges whether each lesion was found. The rules:

- **lesions** are the connected components of the target's mask (cc3d, ``connected-components-3d``), full
  connectivity unless told (26 in 3D, 8 in 2D), on the reference and on the prediction separately;
- **matching** is one-to-one: a predicted lesion detects a reference lesion when their IoU is at least
  ``iou_threshold``; among such pairs the pairing with the largest total IoU is kept (scipy's
  ``linear_sum_assignment``). Above 0.5 a lesion can have only one partner, so the pairing is unique. In 3D at
  the default 0.5 this is panoptica's default semantic pipeline (cc3d components, IoU >= 0.5, one-to-one),
  the library BraTS uses for lesion-wise scores; below 0.5, where pairings compete, panoptica's default pairs
  greedily by IoU and may differ. The rules are re-stated here because panoptica 2.1.7 pins numpy < 2.3,
  cc3d < 4, pandas < 3 and rich < 14, below this project's environment (docs/submission.md, "Lesion-wise
  scores");
- per case: ``n_ref``, ``n_pred``, ``tp`` (matched pairs), ``fn`` (reference lesions without a partner), ``fp``
  (predicted lesions without a partner), ``sensitivity`` = tp / n_ref;
- **lesion-wise Dice**: the mean over the reference lesions and the false-positive lesions, a matched reference
  lesion scoring the Dice with its partner, a missed one and every false positive scoring 0 (the penalty of
  BraTS 2023's lesion-wise Dice); ``matched_dice`` is the mean Dice of the matched pairs alone (panoptica's
  segmentation quality), so detection and delineation can be read apart;
- **empty masks** follow the challenge's convention (see evaluate.py): no lesion on either side scores NaN
  (``"nan"``) or 1 (``"one"``) for sensitivity and both Dice scores; lesions on one side only score 0 Dice, and
  a sensitivity of 0 under ``"one"`` and NaN under ``"nan"`` when only the prediction has lesions (there is no
  reference lesion to detect).

A merge costs a detection: two reference lesions joined in one predicted component can match only one of them,
and neither when the component is more than twice the size of each (IoU < 0.5).

This module reads no file and knows no profile: evaluate.py gives it masks, spacing and the convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy.optimize import linear_sum_assignment

_CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}


@dataclass(frozen=True)
class LesionSpec:
    """Which targets are scored lesion-wise (names, aliases or keys such as ``"2"``, ``"2+3"``) and how."""

    targets: tuple[str, ...]
    iou_threshold: float = 0.5
    # None: full connectivity (26 in 3D, 8 in 2D), which joins diagonal neighbours as one lesion.
    connectivity: int | None = None

    def __post_init__(self):
        if not self.targets:
            raise ValueError("lesion-wise scoring needs at least one target")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"lesion IoU threshold {self.iou_threshold}: expected 0 < threshold <= 1")
        allowed = sorted({c for cs in _CONNECTIVITIES.values() for c in cs})
        if self.connectivity is not None and self.connectivity not in allowed:
            raise ValueError(f"lesion connectivity {self.connectivity}: expected one of {allowed}")


def _connectivity(ndim: int, connectivity: int | None) -> int:
    if ndim not in _CONNECTIVITIES:
        raise ValueError(f"lesion-wise scores need 2D or 3D masks, got {ndim}D")
    if connectivity is None:
        return _CONNECTIVITIES[ndim][-1]
    if connectivity not in _CONNECTIVITIES[ndim]:
        raise ValueError(
            f"lesion connectivity {connectivity} for a {ndim}D image: expected one of {_CONNECTIVITIES[ndim]}"
        )
    return connectivity


def _crop_to_union(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union: components and counts are unchanged, and a 512^2 x 100
    case with a few lesions leaves a small box for cc3d."""
    union = ref | pred
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        box.append(slice(hit[0], hit[-1] + 1))
    return ref[tuple(box)], pred[tuple(box)]


def _empty_score(empty: str) -> float:
    if empty not in ("nan", "one"):
        raise ValueError(f"empty-mask convention {empty!r}: expected 'nan' or 'one'")
    return math.nan if empty == "nan" else 1.0


def score_lesions(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    iou_threshold: float = 0.5,
    connectivity: int | None = None,
    empty: str = "nan",
) -> dict:
    """Lesion-wise scores of two boolean masks (array axis order, ``spacing`` in mm in the same order).

    Returns the counts, ``sensitivity``, ``lesion_dice``, ``matched_dice``, ``fp_volume_mm3`` and
    ``reference_lesions``: per reference lesion its ``volume_mm3``, ``detected``, and ``iou`` / ``dice`` with
    its partner (0 when missed), largest lesion first (for scores per lesion-size bin)."""
    both_empty = _empty_score(empty)
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    if ref.shape != pred.shape:
        raise ValueError(f"shape {pred.shape} of the prediction != reference {ref.shape}")
    conn = _connectivity(ref.ndim, connectivity)
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    counts = {"n_ref": 0, "n_pred": 0, "tp": 0, "fn": 0, "fp": 0}
    if not ref.any() and not pred.any():
        scores = {"sensitivity": both_empty, "lesion_dice": both_empty, "matched_dice": both_empty}
        return {**counts, **scores, "fp_volume_mm3": 0.0, "reference_lesions": []}
    ref, pred = _crop_to_union(ref, pred)
    ref_lab, n_ref = cc3d.connected_components(ref, connectivity=conn, return_N=True)
    pred_lab, n_pred = cc3d.connected_components(pred, connectivity=conn, return_N=True)
    n_ref, n_pred = int(n_ref), int(n_pred)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]

    # Intersections of every overlapping (reference, predicted) pair, from the voxels both masks share.
    shared = ref & pred
    code = (ref_lab[shared].astype(np.int64) - 1) * n_pred + (pred_lab[shared].astype(np.int64) - 1)
    code, inter = np.unique(code, return_counts=True)
    ri, pj = np.divmod(code, max(n_pred, 1))
    iou = inter / (ref_size[ri] + pred_size[pj] - inter)
    ok = iou >= iou_threshold
    ri, pj, inter, iou = ri[ok], pj[ok], inter[ok], iou[ok]

    partner_iou = np.zeros(n_ref)
    partner_dice = np.zeros(n_ref)
    pred_matched = np.zeros(n_pred, bool)
    if ri.size:
        rows, r_idx = np.unique(ri, return_inverse=True)
        cols, c_idx = np.unique(pj, return_inverse=True)
        weight = np.zeros((rows.size, cols.size))
        weight[r_idx, c_idx] = iou
        a, b = linear_sum_assignment(weight, maximize=True)
        a, b = a[weight[a, b] > 0], b[weight[a, b] > 0]
        r, p = rows[a], cols[b]
        partner_iou[r] = weight[a, b]
        partner_dice[r] = 2 * partner_iou[r] / (1 + partner_iou[r])
        pred_matched[p] = True
    detected = partner_iou > 0
    tp = int(detected.sum())
    fp = n_pred - tp
    if n_ref == 0:
        sensitivity = math.nan if empty == "nan" else 0.0
    else:
        sensitivity = tp / n_ref
    lesion_dice = float(partner_dice.sum() / (n_ref + fp))
    matched_dice = float(partner_dice[detected].mean()) if tp else 0.0
    order = np.argsort(-ref_size, kind="stable")
    return {
        "n_ref": n_ref,
        "n_pred": n_pred,
        "tp": tp,
        "fn": n_ref - tp,
        "fp": fp,
        "sensitivity": float(sensitivity),
        "lesion_dice": lesion_dice,
        "matched_dice": matched_dice,
        "fp_volume_mm3": float(pred_size[~pred_matched].sum() * voxel_mm3),
        "reference_lesions": [
            {
                "volume_mm3": float(ref_size[i] * voxel_mm3),
                "detected": bool(detected[i]),
                "iou": float(partner_iou[i]),
                "dice": float(partner_dice[i]),
            }
            for i in order
        ],
    }


def summarise(per_case: Sequence[dict]) -> dict:
    """Means over cases of one target's lesion scores (NaN left out) and pooled counts.

    ``pooled_sensitivity`` (all detected over all reference lesions) weights every lesion equally, as lesion
    detection studies report it; ``sensitivity`` is the mean of the per-case values and weights every case
    equally. ``fp_per_case`` is the mean false-positive count over all cases."""

    def nanmean(key: str) -> float:
        values = [c[key] for c in per_case if not math.isnan(c[key])]
        return float(np.mean(values)) if values else math.nan

    total = {k: int(sum(c[k] for c in per_case)) for k in ("n_ref", "n_pred", "tp", "fn", "fp")}
    return {
        **total,
        "sensitivity": nanmean("sensitivity"),
        "pooled_sensitivity": total["tp"] / total["n_ref"] if total["n_ref"] else math.nan,
        "fp_per_case": total["fp"] / len(per_case) if per_case else math.nan,
        "lesion_dice": nanmean("lesion_dice"),
        "matched_dice": nanmean("matched_dice"),
    }
