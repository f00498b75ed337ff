"""Case-level metrics of class predictions against a reference table, and their two plots.

Owns ``mim_nnunet_classify evaluate``'s maths, all from scikit-learn: accuracy, balanced accuracy, macro F1, macro
one-vs-rest AUROC (for two classes the AUROC of the second class' probability, which is the same number), per-class
AUROC and F1, the confusion matrix (rows: reference, columns: prediction, classes in ``dataset.json`` order);
``confusion.png`` and ``roc.png`` beside the JSON. A class absent from the reference has no AUROC (None), and the
macro AUROC is then taken over the classes present. Training's validation uses :func:`classification_metrics`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from ..atomic import atomic_write_json
from ..plots import _save
from .dataset import DatasetError, read_class_table

CONFUSION_PNG = "confusion.png"
ROC_PNG = "roc.png"
PROB_PREFIX = "p_"


def auroc_per_class(y: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC of each class; None where the reference has only one side of that class."""
    out = []
    for k in range(probs.shape[1]):
        positive = y == k
        out.append(float(roc_auc_score(positive, probs[:, k])) if 0 < positive.sum() < len(y) else None)
    return out


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """sklearn's macro one-vs-rest AUROC over the classes the reference has (None: fewer than two)."""
    present = np.unique(y)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) == probs.shape[1]:
        return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))
    return float(np.mean([a for a in auroc_per_class(y, probs) if a is not None]))


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Every metric of ``metrics.json`` for references ``y`` (class indices) and ``probs`` (N, K)."""
    y = np.asarray(y, dtype=int)
    pred = probs.argmax(1)
    labels = list(range(len(classes)))
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    auc = auroc_per_class(y, probs)
    return {
        "cases": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "auroc_macro": macro_auroc(y, probs),
        "per_class": {name: {"auroc": auc[k], "f1": float(f1[k]), "support": int((y == k).sum())}
                      for k, name in enumerate(classes)},  # fmt: skip
        "classes": list(classes),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def read_predictions(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(cases, classes, probabilities) of a ``predictions.csv`` (columns case, class, p_<class> ...)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = list(rows[0].keys()) if rows else []
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror})") from None
    classes = [h[len(PROB_PREFIX):] for h in header if h.startswith(PROB_PREFIX)]
    if not rows or "case" not in header or len(classes) < 2:
        raise DatasetError(f"{path}: expected columns case, class, p_<class> for two or more classes, got {header}")
    try:
        probs = np.array([[float(r[PROB_PREFIX + c]) for c in classes] for r in rows])
    except ValueError as e:
        raise DatasetError(f"{path}: a probability is not a number ({e})") from None
    return [r["case"] for r in rows], classes, probs


def evaluate(predictions: str | Path, reference: str | Path, out: str | Path) -> dict:
    """``metrics.json`` at ``out`` and the two plots beside it; every case of the reference must be predicted."""
    cases, classes, probs = read_predictions(predictions)
    ref = read_class_table(reference, classes)
    index = {c: i for i, c in enumerate(cases)}
    missing = sorted(set(ref) - set(index))
    if missing:
        raise DatasetError(f"{predictions}: case {missing[0]} of {reference} is not predicted ({len(missing)} missing)")
    order = sorted(ref)
    y = np.array([ref[c] for c in order])
    p = probs[[index[c] for c in order]]
    metrics = classification_metrics(y, p, classes) | {"predictions": str(predictions), "reference": str(reference)}
    if extra := sorted(set(index) - set(ref)):
        metrics["not_in_reference"] = extra
    out = Path(out)
    atomic_write_json(out, metrics)
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, out.parent / CONFUSION_PNG)
    plot_roc(y, p, classes, metrics, out.parent / ROC_PNG)
    return metrics


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    fig = Figure(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2.5), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False)
    ax.set_title("confusion matrix (rows: reference)")
    _save(fig, path)


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], metrics: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    for k, name in enumerate(classes):
        auc = metrics["per_class"][name]["auroc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    macro = metrics["auroc_macro"]
    ax.set_title(f"one-vs-rest ROC, macro AUROC {macro:.3f}" if macro is not None and not math.isnan(macro) else "ROC")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    _save(fig, path)
