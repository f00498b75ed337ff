"""Cross-validation folds of a classification run, in nnU-Net's ``splits_final.json`` format.

A list of five ``{"train": [...], "val": [...]}`` dicts. When the dataset's nnU-Net preprocessed folder
(``$nnUNet_preprocessed/<dataset folder name>/splits_final.json``) has one, it is used (the same folds as a
segmentation run of that dataset); otherwise the run makes its own, stratified by class (scikit-learn's
``StratifiedKFold``, shuffled with nnU-Net's seed 12345, so each fold validates on every class in proportion), and
keeps it in the run folder. ``fold="all"`` trains on every case and validates on none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sklearn.model_selection import StratifiedKFold

from ..atomic import atomic_write_json
from ..pretrain.folder import SPLITS
from .dataset import ClassificationDataset, DatasetError, check_folds

NUM_FOLDS = 5
SPLIT_SEED = 12345  # nnU-Net's


def stratified_splits(cases: list[str], labels: list[int], folds: int = NUM_FOLDS) -> list[dict[str, list[str]]]:
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SPLIT_SEED)
    out = []
    for tr, va in skf.split(cases, labels):
        out.append({"train": sorted(cases[i] for i in tr), "val": sorted(cases[i] for i in va)})
    return out


def preprocessed_splits_file(ds: ClassificationDataset) -> Path | None:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        return None
    path = Path(root) / ds.root.name / SPLITS
    return path if path.is_file() else None


def read_splits(path: Path, ds: ClassificationDataset) -> list[dict[str, list[str]]]:
    try:
        splits = json.loads(path.read_text())
        [(s["train"], s["val"]) for s in splits]  # noqa: B018 -- the format's keys
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a splits_final.json (a list of {{'train', 'val'}}: {e})") from None
    for n, s in enumerate(splits):
        unknown = sorted((set(s["train"]) | set(s["val"])) - set(ds.labels))
        if unknown:
            raise DatasetError(f"{path}: fold {n} names case {unknown[0]}, which has no row in classesTr.csv")
    return splits


def fold_cases(
    ds: ClassificationDataset, fold: str, out: Path, write: bool = True, reuse: bool = True
) -> tuple[list[str], list[str], str]:
    """(training cases, validation cases, where the split came from) of ``fold`` ("0".."4" or "all"). A split the
    run makes is written to ``out`` unless ``write`` is False (checking a request before anything is written);
    ``reuse=False`` ignores one already in ``out`` (a run being replaced)."""
    if fold == "all":
        return ds.cases, [], "all cases (no validation)"
    if not fold.isdigit():
        raise DatasetError(f"--fold {fold!r}: expected 0-{NUM_FOLDS - 1} or all")
    path = preprocessed_splits_file(ds)
    if path is not None:
        splits = read_splits(path, ds)
    elif reuse and (out / SPLITS).is_file():
        path = out / SPLITS
        splits = read_splits(path, ds)
    else:
        check_folds(ds, NUM_FOLDS)
        path = out / SPLITS
        splits = stratified_splits(ds.cases, [ds.labels[c] for c in ds.cases])
        if write:
            atomic_write_json(path, splits)
    k = int(fold)
    if k >= len(splits):
        raise DatasetError(f"--fold {fold}: {path} has {len(splits)} folds")
    return splits[k]["train"], splits[k]["val"], str(path)
