"""A classification dataset in the nnU-Net raw layout: where it is, which cases and classes it has, and checks.

Owns the dataset contract (docs/classification.md): ``imagesTr/CASE_XXXX<file_ending>`` (one file per channel of
``channel_names``), optional ``imagesTs/``, ``dataset.json`` with ``channel_names``, ``file_ending`` and
``"classes": [name, ...]`` (index = position) and a table ``classesTr.csv`` (header ``case,class``, classes by
name; optional ``classesTs.csv``). A dataset is given as a folder or as an nnU-Net dataset id / name looked up in
``$nnUNet_raw`` as the other commands do. Every problem is a :class:`DatasetError`: one line naming the file and
the case or value. Reading and resampling images is :mod:`.images`' business; this module only lists files.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.sources import _nnunet_dataset_folder  # the id / name lookup the pre-training inputs use

DATASET_JSON = "dataset.json"
CLASSES_TR = "classesTr.csv"
CLASSES_TS = "classesTs.csv"
HEADER = ("case", "class")


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and the case or value."""


@dataclass
class ClassificationDataset:
    root: Path
    classes: list[str]
    channel_names: dict[str, str]
    file_ending: str
    labels: dict[str, int]  # training case -> class index (classesTr.csv)
    images: dict[str, list[Path]] = field(default_factory=dict)  # training case -> one file per channel

    @property
    def cases(self) -> list[str]:
        return sorted(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels.values())
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


def resolve_dataset_folder(spec: str | os.PathLike) -> Path:
    """A dataset folder from a path, or from an nnU-Net dataset id / ``DatasetXXX_Name`` / ``Name`` in $nnUNet_raw."""
    path = Path(spec)
    if path.is_dir():
        return path
    try:
        found = _nnunet_dataset_folder(str(spec))
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if found is None:
        where = os.environ.get("nnUNet_raw")
        raise DatasetError(
            f"{spec}: no such dataset folder, and no nnU-Net dataset of that id or name in "
            + (f"$nnUNet_raw ({where})" if where else "$nnUNet_raw (not set)")
        )
    return found


def read_dataset_json(root: Path) -> tuple[list[str], dict[str, str], str]:
    """``classes``, ``channel_names`` and ``file_ending`` of ``root/dataset.json``."""
    path = root / DATASET_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not readable as JSON ({e})") from None
    missing = [k for k in ("classes", "channel_names", "file_ending") if k not in info]
    if missing:
        raise DatasetError(f"{path}: lacks {missing} (a classification dataset needs \"classes\": [names...])")
    classes = info["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise DatasetError(f"{path}: \"classes\" must be a list of at least two names, got {classes!r}")
    if len(set(classes)) != len(classes):
        dup = sorted(c for c, n in Counter(classes).items() if n > 1)
        raise DatasetError(f"{path}: class names repeated in \"classes\": {dup}")
    channels = {str(k): str(v) for k, v in info["channel_names"].items()}
    return list(classes), channels, str(info["file_ending"])


def read_class_table(path: str | os.PathLike, classes: list[str]) -> dict[str, int]:
    """case -> class index from a ``case,class`` CSV; class names must be among ``classes``."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror})") from None
    if not rows or tuple(c.strip() for c in rows[0]) != HEADER:
        raise DatasetError(f"{path}: the header must be 'case,class', got {','.join(rows[0]) if rows else '(empty)'!r}")
    index = {name: i for i, name in enumerate(classes)}
    out: dict[str, int] = {}
    for n, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}: line {n} has {len(row)} fields, expected 2 (case,class)")
        case, name = row[0].strip(), row[1].strip()
        if name not in index:
            raise DatasetError(f"{path}: line {n}, case {case}: class {name!r} is not in dataset.json's classes {classes}")
        if case in out:
            raise DatasetError(f"{path}: line {n}: case {case} is listed twice")
        out[case] = index[name]
    if not out:
        raise DatasetError(f"{path}: no cases listed")
    return out


def case_files(folder: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """case -> its channel files ``CASE_0000<ending>``, ... in ``folder`` (a case missing a channel is an error)."""
    suffix = f"_0000{file_ending}"
    out = {}
    for p in sorted(folder.glob(f"*{suffix}")):
        case = p.name[: -len(suffix)]
        files = [folder / f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise DatasetError(f"{folder}: case {case} lacks the channel file(s) {absent}")
        out[case] = files
    return out


def load_dataset(spec: str | os.PathLike, folds: int | None = None) -> ClassificationDataset:
    """The training part of a dataset, checked: every row has its images, every image its row, and (with
    ``folds``) every class at least ``folds`` cases, so that each fold validates on it."""
    root = resolve_dataset_folder(spec)
    classes, channels, ending = read_dataset_json(root)
    table = root / CLASSES_TR
    if not table.is_file():
        raise DatasetError(f"{table}: not found (a case,class table of the training cases)")
    labels = read_class_table(table, classes)
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: not found")
    images = case_files(images_dir, ending, len(channels))
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DatasetError(
            f"{table}: case {no_image[0]} has no image {images_dir / (no_image[0] + '_0000' + ending)}"
            + (f" ({len(no_image)} cases without images)" if len(no_image) > 1 else "")
        )
    no_row = sorted(set(images) - set(labels))
    if no_row:
        raise DatasetError(
            f"{images[no_row[0]][0]}: case {no_row[0]} has no row in {table}"
            + (f" ({len(no_row)} images without rows)" if len(no_row) > 1 else "")
        )
    ds = ClassificationDataset(root, classes, channels, ending, labels, images)
    if folds is not None:
        check_folds(ds, folds)
    return ds


def check_folds(ds: ClassificationDataset, folds: int) -> None:
    small = {name: n for name, n in ds.class_counts().items() if n < folds}
    if small:
        name, n = next(iter(small.items()))
        raise DatasetError(
            f"{ds.root / CLASSES_TR}: class {name!r} has {n} case(s), fewer than the {folds} folds "
            "(each fold must see every class); add cases or train with --fold all"
        )
