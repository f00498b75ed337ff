"""Cost of lesion-wise scores against the Dice + NSD that ``mim_nnunet_submit evaluate`` computes anyway, on one
512 x 512 x 100 case. Goal: lesion-wise scoring adds at most the time of that case's Dice + NSD.

The case is a liver-tumour CT as MSD Task03 / LiTS cases look: 0.78 x 0.78 x 2.5 mm voxels, a liver (label 1)
and six tumours (label 2, radii 2.5-20 mm). The prediction misses the smallest tumour, resizes and shifts the
others, adds two false tumours and shifts the liver. Both targets are scored as evaluate does (Dice + NSD with
FLARE's liver 5 mm and lesion 2 mm tolerances, ``score_target``); lesion-wise scores are computed for the tumour
target (``score_lesions`` on the masks evaluate builds). A second prediction adds ``--specks`` single-voxel
false tumours, the noisy output that makes matching expensive. Times are medians over ``--repeats`` runs.

    python benchmarks/bench_lesion_scores.py                 # about a minute on a 2-core CPU
    python benchmarks/bench_lesion_scores.py --repeats 5 --specks 2000 --json lesion_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mim_nnunet.submission.evaluate import score_target
from mim_nnunet.submission.lesions import score_lesions
from mim_nnunet.submission.profiles import Target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402 -- benchmarks/machine.py, also when loaded by path

SHAPE = (100, 512, 512)  # z, y, x (SimpleITK array order)
SPACING = (2.5, 0.78, 0.78)  # mm, same order
TARGETS = (Target("liver", (1,), 5.0), Target("tumour", (2,), 2.0))
TUMOUR_RADII_MM = (2.5, 4.0, 6.0, 10.0, 15.0, 20.0)


def paint_ellipsoid(seg: np.ndarray, centre_mm, radii_mm, value: int) -> None:
    """Set ``value`` inside an axis-aligned ellipsoid given in mm, computed on its bounding box only."""
    lo = [max(0, int((c - r) / s)) for c, r, s in zip(centre_mm, radii_mm, SPACING)]
    hi = [min(n, int((c + r) / s) + 2) for c, r, s, n in zip(centre_mm, radii_mm, SPACING, seg.shape)]
    axes = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    d = sum((((ax + 0.5) * s - c) / r) ** 2 for ax, s, c, r in zip(axes, SPACING, centre_mm, radii_mm))
    seg[tuple(slice(a, b) for a, b in zip(lo, hi))][d <= 1.0] = value


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    liver_c, liver_r = (125.0, 200.0, 160.0), (80.0, 90.0, 110.0)
    paint_ellipsoid(ref, liver_c, liver_r, 1)
    paint_ellipsoid(pred, (liver_c[0], liver_c[1], liver_c[2] + 1.6), tuple(1.03 * r for r in liver_r), 1)
    # Tumour centres on a ring inside the liver, far enough apart not to touch.
    for i, r in enumerate(TUMOUR_RADII_MM):
        angle = 2 * np.pi * i / len(TUMOUR_RADII_MM)
        c = (
            liver_c[0] + rng.uniform(-10, 10),
            liver_c[1] + 35 * np.sin(angle),
            liver_c[2] + 45 * np.cos(angle),
        )
        paint_ellipsoid(ref, c, (r, r, r), 2)
        if i == 0:
            continue  # the smallest tumour is missed
        grow = rng.uniform(-1.0, 1.0)
        shift = rng.uniform(-1.0, 1.0, 3)
        paint_ellipsoid(pred, tuple(c + shift), (r + grow,) * 3, 2)
    for c, r in (((125.0, 200.0, 160.0), 3.0), ((100.0, 240.0, 200.0), 5.0)):  # two false tumours
        paint_ellipsoid(pred, c, (r, r, r), 2)
    return ref, pred


def add_specks(pred: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` single voxels of label 2 at random liver voxels of the prediction."""
    rng = np.random.default_rng(seed)
    out = pred.copy()
    liver = np.flatnonzero(out == 1)
    out.flat[rng.choice(liver, size=n, replace=False)] = 2
    return out


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench(ref: np.ndarray, pred: np.ndarray, repeats: int) -> dict:
    def dice_nsd(targets):
        return lambda: {t.name: score_target(ref, pred, SPACING, t, t.tolerance_mm, "one") for t in targets}

    def lesions():
        labels = TARGETS[1].labels
        return score_lesions(np.isin(ref, labels), np.isin(pred, labels), SPACING, 0.5, None, "one")

    t_all, metrics = median_time(dice_nsd(TARGETS), repeats)
    t_tumour, _ = median_time(dice_nsd(TARGETS[1:]), repeats)
    t_les, les = median_time(lesions, repeats)
    return {
        "dice_nsd_s": t_all,
        "dice_nsd_tumour_s": t_tumour,
        "lesions_s": t_les,
        "ratio": t_les / t_all,
        "ratio_tumour": t_les / t_tumour,
        "metrics": metrics,
        "lesions": {k: v for k, v in les.items() if k != "reference_lesions"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--specks", type=int, default=1000, help="single-voxel false tumours in the noisy prediction"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    ref, pred = make_case(args.seed)
    noisy = add_specks(pred, args.specks, args.seed + 1)
    print(
        f"case {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} voxels at {SPACING[::-1]} mm, built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    rows = {
        "prediction": bench(ref, pred, args.repeats),
        f"+ {args.specks} specks": bench(ref, noisy, args.repeats),
    }
    model = cpu_model()
    print(
        f"CPU: {model} ({os.cpu_count()} logical CPUs); numpy {np.__version__}; median of {args.repeats} runs"
    )
    print(
        "| prediction | Dice+NSD liver+tumour | Dice+NSD tumour | lesion-wise tumour | ratio | ratio (tumour) "
        "| ref / pred / TP / FP lesions |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        les = r["lesions"]
        print(
            f"| {name} | {r['dice_nsd_s']:.2f} s | {r['dice_nsd_tumour_s']:.2f} s | {r['lesions_s']:.2f} s "
            f"| {r['ratio']:.2f} | {r['ratio_tumour']:.2f} | {les['n_ref']} / {les['n_pred']} / {les['tp']} / "
            f"{les['fp']} |"
        )
    ok = all(r["ratio"] <= 1.0 for r in rows.values())
    print(f"goal (lesion-wise <= Dice + NSD of the case): {'met' if ok else 'NOT met'}")
    if args.json:
        report = {
            "cpu": model,
            "cpus": os.cpu_count(),
            "shape_zyx": SHAPE,
            "spacing_zyx": SPACING,
            "repeats": args.repeats,
            "specks": args.specks,
            "rows": rows,
            "goal_met": ok,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
