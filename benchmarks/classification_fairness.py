"""Is the chest phantoms' case class a fair test? How well one global lung number decides it.

Generates the first ``--cases`` training cases of the CC-CCII-like classification dataset (the phantoms that
``mim_nnunet_phantoms dataset --task cc-ccii`` writes with this seed, default geometry unless ``--spacing``),
measures the global lung numbers of :data:`mim_nnunet.data.phantoms.LUNG_FEATURES` over each case's true lung
mask, and prints a markdown table (docs/classification.md, "The phantoms"): per class the mean and the range of
each number, and the cross-validated accuracy of a multinomial logistic regression on that number alone (and on
all of them together); chance is 1/3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mim_nnunet.data.phantoms import (
    CLASSIFICATION_TASKS,
    LUNG_FEATURES,
    classification_features,
    single_feature_accuracy,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402 -- benchmarks/machine.py, also when loaded by path

TASK = "cc-ccii"


def table(features: list[dict[str, float]], classes: list[str], accuracy: dict[str, float]) -> str:
    names = list(CLASSIFICATION_TASKS[TASK].classes)
    head = " | ".join(f"{c}: mean (min..max)" for c in names)
    out = [f"| number | {head} | accuracy alone |", "|---|" + "---|" * (len(names) + 1)]
    y = np.asarray(classes)
    for key in (*LUNG_FEATURES, "affected_fraction"):
        x = np.array([f[key] for f in features])
        cells = []
        for c in names:
            v = x[y == c]
            digits = 3 if key.endswith("fraction") else 0
            cells.append(f"{v.mean():.{digits}f} ({v.min():.{digits}f}..{v.max():.{digits}f})")
        acc = f"{accuracy[key]:.3f}" if key in accuracy else "(ground truth, not an input)"
        out.append(f"| {key} | " + " | ".join(cells) + f" | {acc} |")
    out.append("| all five together | " + " | ".join("" for _ in names) + f" | {accuracy['all']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases", type=int, default=60, help="phantoms to measure, balanced over the classes (default 60)"
    )
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("I", "J", "K"),
        help="voxel spacing of every case in mm (default: the dataset's, drawn per case)",
    )
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    features, classes = classification_features(TASK, a.seed, a.cases, spacing=a.spacing)
    seconds = (time.perf_counter() - t0) / a.cases
    accuracy = single_feature_accuracy(features, classes, folds=a.folds, seed=a.seed)
    best = max(LUNG_FEATURES, key=lambda k: accuracy[k])
    print(
        f"{a.cases} phantoms ({', '.join(f'{c} {classes.count(c)}' for c in dict.fromkeys(classes))}), "
        f"{seconds:.2f} s per case, {cpu_model()}; best single number: {best}, accuracy {accuracy[best]:.3f} "
        f"(chance {1 / len(set(classes)):.3f}, {a.folds}-fold cross-validation)\n"
    )
    print(table(features, classes, accuracy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
