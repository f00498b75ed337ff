"""Scoring predictions against references as the challenges score them: Dice and normalised surface Dice (NSD).

NSD (Nikolov et al., 2021) is computed by DeepMind's ``surface-distance`` library (PyPI ``surface-distance``),
the implementation KiTS23 installs for its official metrics and FLARE22/23 ship a copy of
(``FLARE22/Evaluation/SurfaceDice.py``). Its surface is made of surface elements on the voxel corners, each
weighted by its area in mm^2 at the image spacing; NSD is the area of both surfaces within ``tolerance`` mm of
the other surface over the total area. Using the library rather than a re-implementation makes our numbers the
challenges' numbers.

What a challenge adds around the two metrics comes from its profile (``evaluation`` block, see profiles.py):

- targets: single labels or hierarchical regions (KiTS23: kidney_and_mass {1,2,3}, mass {2,3}, tumor {2}), each
  with its own NSD tolerance (FLARE: liver 5 mm ... duodenum 7 mm);
- empty masks: ``"one"`` (KiTS23, FLARE: both empty -> Dice 1 and NSD 1, one empty -> 0 and 0) or ``"nan"``
  (nnU-Net's ``evaluate_folder``: a label absent from both files is NaN and left out of the means);
- ``nsd_zero_below_dice`` (FLARE: NSD is 0 when Dice is below 0.2; FLARE23 during the challenge: 0.1);
- ``reference_z_range`` (FLARE: aorta, IVC and oesophagus are scored only on the slices [first, last) that the
  reference labels along the third voxel axis; the official slicing leaves the last labelled slice out, and so
  does this code);
- ``mean_excludes`` (FLARE23's organ mean leaves the lesion out).

Without a profile the conventions are nnU-Net's (Dice via ``compute_tp_fp_fn_tn``, NaN for both-empty).

Lesion-wise scores (counts, detection sensitivity, false positives, lesion-wise Dice) of the targets a
:class:`~mim_nnunet.submission.lesions.LesionSpec` names are computed by lesions.py with the same empty-mask
convention; the profile's ``reference_z_range`` crop does not apply to them.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import surface_distance
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

from .lesions import LesionSpec, score_lesions, summarise
from .profiles import IMAGE_ENDINGS, EvaluationSpec, Target
from .validate import check_geometry

# surface-distance 0.1 imports correlate/distance_transform_edt through scipy.ndimage.filters/.morphology, which
# SciPy deprecates (removed in SciPy 2.0; pyproject pins scipy<2). The numbers are unaffected.
_SCIPY_NAMESPACE_WARNING = r"Please import .* from the `scipy\.ndimage` namespace"


def _check_empty(empty: str) -> None:
    if empty not in ("nan", "one"):
        raise ValueError(f"empty-mask convention {empty!r}: expected 'nan' or 'one'")


def normalized_surface_dice(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float, empty: str = "nan"
) -> float:
    """NSD of two boolean masks (array axis order, ``spacing`` in the same order) by DeepMind's surface-distance.

    Both empty: NaN (``empty="nan"``) or 1 (``"one"``); one empty: 0."""
    _check_empty(empty)
    ref, pred = ref.astype(bool), pred.astype(bool)
    if ref.shape != pred.shape:
        raise ValueError(f"shape {pred.shape} of the prediction != reference {ref.shape}")
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        return math.nan if empty == "nan" else 1.0
    if not has_ref or not has_pred:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCIPY_NAMESPACE_WARNING, category=DeprecationWarning)
        distances = surface_distance.compute_surface_distances(ref, pred, tuple(float(s) for s in spacing))
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, float(tolerance_mm)))


def dice(ref: np.ndarray, pred: np.ndarray, empty: str = "nan") -> float:
    """nnU-Net's Dice 2TP / (2TP + FP + FN); both masks empty: NaN (``"nan"``) or 1 (``"one"``)."""
    _check_empty(empty)
    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref.astype(bool), pred.astype(bool))
    if tp + fp + fn == 0:
        return math.nan if empty == "nan" else 1.0
    return float(2 * tp / (2 * tp + fp + fn))


def score_target(
    ref_seg: np.ndarray,
    pred_seg: np.ndarray,
    spacing: Sequence[float],
    target: Target,
    tolerance_mm: float,
    empty: str = "nan",
    nsd_zero_below_dice: float | None = None,
) -> dict[str, float]:
    """{"Dice", "NSD"} of one target (label or region) in one case, with the challenge's conventions."""
    _check_empty(empty)
    r = np.isin(ref_seg, target.labels)
    p = np.isin(pred_seg, target.labels)
    has_r, has_p = bool(r.any()), bool(p.any())
    if not has_r and not has_p:
        v = math.nan if empty == "nan" else 1.0
        return {"Dice": v, "NSD": v}
    if not has_r or not has_p:
        return {"Dice": 0.0, "NSD": 0.0}
    if target.reference_z_range:
        if r.ndim != 3:
            raise ValueError(f"target {target.name}: reference_z_range needs 3D images, got {r.ndim}D")
        # SimpleITK array axis 0 = the third voxel axis (nibabel's axis 2, which FLARE's script slices).
        z = np.flatnonzero(r.any(axis=(1, 2)))
        r, p = r[z.min() : z.max()], p[z.min() : z.max()]
        if not r.any() and not p.any():
            # One labelled slice: FLARE's slice is empty and its metrics come out NaN.
            return {"Dice": math.nan, "NSD": math.nan}
    d = dice(r, p, "nan")
    if nsd_zero_below_dice is not None and d < nsd_zero_below_dice:
        return {"Dice": d, "NSD": 0.0}
    return {"Dice": d, "NSD": normalized_surface_dice(r, p, spacing, tolerance_mm, "nan")}


def parse_targets(specs: Sequence[int | str | Sequence[int]], tolerance_mm: float | None) -> list[Target]:
    """Targets from ``--labels`` entries: ``3`` is a label, ``"2+3"`` or ``(2, 3)`` a region (their union)."""
    out = []
    for s in specs:
        if isinstance(s, str):
            try:
                values = tuple(int(v) for v in s.split("+"))
            except ValueError:
                raise ValueError(f"target {s!r}: expected an integer label or labels joined by '+'") from None
        elif isinstance(s, (int, np.integer)):
            values = (int(s),)
        else:
            values = tuple(int(v) for v in s)
        if not values or 0 in values:
            raise ValueError(f"target {s!r}: labels must be non-zero")
        key = "+".join(str(v) for v in values)
        out.append(Target(name=key, labels=values, tolerance_mm=tolerance_mm))
    return out


def label_names(labels: Mapping) -> dict[tuple[int, ...], str]:
    """{sorted values: name} of a dataset.json ``labels`` entry ({name: value, or a region's values}) or of a
    profile's ``labels`` ({value: name}); background and nnU-Net's ``ignore`` label are left out."""
    out = {}
    for k, v in labels.items():
        name, value = (v, k) if isinstance(k, int) else (k, v)
        values = tuple(sorted({int(x) for x in (value if isinstance(value, (list, tuple)) else [value])}))
        if name != "ignore" and values != (0,):
            out[values] = str(name)
    return out


def lesion_targets(spec: LesionSpec, targets: Sequence[Target]) -> list[Target]:
    """The scored targets ``spec`` names, by key (``2``, ``2+3``), name or alias (case-insensitive)."""
    out = []
    for wanted in spec.targets:
        w = wanted.lower()
        hit = [t for t in targets if w in {t.key, t.name.lower(), *(a.lower() for a in t.aliases)}]
        if not hit:
            known = ", ".join(t.key if t.name == t.key else f"{t.name} ({t.key})" for t in targets)
            raise ValueError(f"lesion target {wanted!r} is not among the scored targets: {known}")
        if hit[0] not in out:
            out.append(hit[0])
    return out


def check_label_values(path: Path, arr: np.ndarray, values: Collection[int], source: str) -> None:
    """A ValueError naming ``path`` and its first value outside ``values`` (the labels of ``source``)."""
    stray = np.setdiff1d(np.unique(arr), np.asarray(sorted(values)))
    if stray.size:
        raise ValueError(
            f"{path}: holds label value {stray[0].item()}, which is not a label of {source}; expected values in "
            f"{sorted(int(v) for v in values)}"
        )


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    tolerance_mm: float | None = None,
    labels: Sequence[int | str | Sequence[int]] | None = None,
    allow_missing: bool = False,
    spec: EvaluationSpec | None = None,
    empty: str | None = None,
    names: Mapping[tuple[int, ...], str] | None = None,
    lesions: LesionSpec | None = None,
    label_values: Collection[int] | None = None,
    label_values_from: str = "the dataset",
) -> dict:
    """Score every reference file that has a prediction of the same relative path.

    Targets: ``labels`` (labels or '+'-joined regions), else the profile ``spec``'s targets, else every non-zero
    value found in the references. ``tolerance_mm`` overrides the spec's per-target tolerances. ``empty``
    defaults to the spec's convention, else "nan". A reference without prediction is an error unless
    ``allow_missing`` (then it is listed and left out). ``names`` ({sorted values: name}, see
    :func:`label_names`) names the targets that are not the spec's; a target it lacks is named by its values.
    ``lesions`` adds lesion-wise scores of the targets it names (``per_case[i]["lesions"]`` and
    ``result["lesions"]``). ``label_values`` (the values of ``label_values_from``, a profile or a dataset.json):
    a reference or prediction holding any other value is an error naming the file and the value.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    empty = empty or (spec.empty if spec else "nan")
    _check_empty(empty)
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
        if label_values is not None:
            for path, arr in ((r, ref_arr), (pred_dir / rel, pred_arr)):
                check_label_values(path, arr, label_values, label_values_from)
        loaded.append((rel, ref_arr, pred_arr, ref_img.GetSpacing()[::-1]))
    if labels is not None:
        targets = parse_targets(labels, tolerance_mm)
    elif spec is not None and spec.targets:
        targets = [
            Target(
                t.name,
                t.labels,
                tolerance_mm if tolerance_mm is not None else t.tolerance_mm,
                t.reference_z_range,
                t.aliases,
            )
            for t in spec.targets
        ]
    else:
        found = sorted({int(v) for _, ref_arr, _, _ in loaded for v in np.unique(ref_arr)} - {0})
        targets = parse_targets(found, tolerance_mm)
    if names and (labels is not None or spec is None or not spec.targets):
        targets = [replace(t, name=names.get(tuple(sorted(t.labels)), t.name)) for t in targets]
    no_tol = [t.name for t in targets if t.tolerance_mm is None]
    if no_tol:
        raise ValueError(f"targets {no_tol} have no NSD tolerance: pass --tolerance MM")
    floor = spec.nsd_zero_below_dice if spec is not None else None
    excludes = set(spec.mean_excludes) if spec is not None else set()
    lesion_on = lesion_targets(lesions, targets) if lesions is not None else []
    per_case = []
    for rel, ref_arr, pred_arr, spacing in loaded:
        metrics = {
            t.key: score_target(ref_arr, pred_arr, spacing, t, t.tolerance_mm, empty, floor) for t in targets
        }
        per_case.append({"case": rel, "metrics": metrics})
        if lesion_on:
            try:
                per_case[-1]["lesions"] = {
                    t.key: score_lesions(
                        np.isin(ref_arr, t.labels),
                        np.isin(pred_arr, t.labels),
                        spacing,
                        lesions.iou_threshold,
                        lesions.connectivity,
                        empty,
                    )
                    for t in lesion_on
                }
            except ValueError as e:
                raise ValueError(f"{rel}: {e}") from None
    mean = {
        t.key: {m: _nanmean([c["metrics"][t.key][m] for c in per_case]) for m in ("Dice", "NSD")}
        for t in targets
    }
    in_mean = [t.key for t in targets if t.name not in excludes]
    foreground_mean = {m: _nanmean([mean[k][m] for k in in_mean]) for m in ("Dice", "NSD")}
    lesion_result = None
    if lesion_on:
        lesion_result = {
            "targets": [t.key for t in lesion_on],
            "iou_threshold": lesions.iou_threshold,
            "connectivity": lesions.connectivity,
            "mean": {t.key: summarise([c["lesions"][t.key] for c in per_case]) for t in lesion_on},
        }
    return {
        "targets": [
            {
                "key": t.key,
                "name": t.name,
                "labels": list(t.labels),
                "tolerance_mm": t.tolerance_mm,
                "reference_z_range": t.reference_z_range,
                "in_mean": t.key in in_mean,
            }
            for t in targets
        ],
        "empty": empty,
        "nsd_zero_below_dice": floor,
        "n_cases": len(per_case),
        "missing": missing,
        "per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "lesions": lesion_result,
    }


def format_table(result: dict) -> str:
    """A plain-text table of the per-target means and the foreground mean."""
    rows = [f"{'target':>24} {'tol mm':>8} {'Dice':>8} {'NSD':>8}"]
    for t in result["targets"]:
        m = result["mean"][t["key"]]
        name = t["name"] if t["name"] == t["key"] else f"{t['name']} ({t['key']})"
        flag = "" if t["in_mean"] else "  (not in mean)"
        rows.append(f"{name:>24} {t['tolerance_mm']:>8g} {m['Dice']:>8.4f} {m['NSD']:>8.4f}{flag}")
    fm = result["foreground_mean"]
    rows.append(f"{'mean':>24} {'':>8} {fm['Dice']:>8.4f} {fm['NSD']:>8.4f}")
    rows.append(
        f"({result['n_cases']} cases" + (f", {len(result['missing'])} missing)" if result["missing"] else ")")
    )
    les = result.get("lesions")
    if les:
        conn = les["connectivity"] or "full"
        thr, empty = les["iou_threshold"], result["empty"]
        rows.append(f"lesions (IoU >= {thr:g}, connectivity {conn}, empty masks: {empty})")
        rows.append(
            f"{'target':>24} {'ref':>5} {'pred':>5} {'TP':>5} {'FN':>5} {'FP':>5} {'sens':>7} {'sens/les':>8} "
            f"{'FP/case':>7} {'les.Dice':>8} {'match.Dice':>10}"
        )
        names = {t["key"]: t["name"] for t in result["targets"]}
        for key in les["targets"]:
            m = les["mean"][key]
            name = names[key] if names[key] == key else f"{names[key]} ({key})"
            rows.append(
                f"{name:>24} {m['n_ref']:>5} {m['n_pred']:>5} {m['tp']:>5} {m['fn']:>5} {m['fp']:>5} "
                f"{m['sensitivity']:>7.4f} {m['pooled_sensitivity']:>8.4f} {m['fp_per_case']:>7.2f} "
                f"{m['lesion_dice']:>8.4f} {m['matched_dice']:>10.4f}"
            )
        rows.append("(sens: mean over cases; sens/les: detected / reference lesions, all cases pooled)")
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
