"""The labels of an nnU-Net ``dataset.json``: plain labels or regions, and the values its label files hold.

Owns one reading of ``labels`` + ``regions_class_order`` and the checks that the planner
(``mim_nnunet_plan_and_preprocess``) and the submission tools (``mim_nnunet_submit``, ``evaluate``) apply to it,
so that planning, prediction and scoring refuse the same datasets with the same message. Pure Python: it imports
neither nnU-Net nor torch and reads no file.

nnU-Net trains region-based when a label maps to a list of more than one value (its ``LabelManager``): one
sigmoid head per foreground region, in ``labels`` order, and at export it writes ``regions_class_order[i]``
wherever head i is above 0.5, in that order. The only values an exported label map can hold are therefore
background 0 and the ``regions_class_order`` values; these are the dataset's label values, and its label files
must use them. Hence, for a region dataset (docs/submission.md, "Plain labels and regions"):

- ``regions_class_order`` has one value per foreground region;
- ``regions_class_order[i]`` is one of region i's values (else the exported map, turned back into regions, does
  not hold region i where it was predicted);
- every value a region names is a label value (background or in ``regions_class_order``): a value no export can
  write is a typo or a label the model can never predict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class DatasetLabelsError(ValueError):
    """A dataset.json ``labels`` / ``regions_class_order`` that nnU-Net would train or export wrongly."""


@dataclass(frozen=True)
class DatasetLabels:
    """What a dataset.json says about its labels.

    ``values``: the label values its label files and exported predictions hold (background included).
    ``regions``: {name: values} of the foreground regions in nnU-Net's order, None for plain labels.
    ``written``: {name: value} each label (plain) or region (its ``regions_class_order`` entry) writes.
    ``ignore``: nnU-Net's ignore label, which label files may hold and predictions never do.
    """

    values: tuple[int, ...]
    written: dict[str, int]
    regions: dict[str, tuple[int, ...]] | None = None
    regions_class_order: tuple[int, ...] | None = None
    ignore: int | None = None

    @property
    def has_regions(self) -> bool:
        return self.regions is not None


def _as_values(name: str, entry, where: str) -> tuple[int, ...]:
    items = entry if isinstance(entry, (list, tuple)) else [entry]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise DatasetLabelsError(
            f"{where}: label {name!r} is {entry!r}; expected a non-negative integer or a list of them (a region)"
        )
    return tuple(int(v) for v in items)


def dataset_labels(dataset: Mapping, where: str = "dataset.json") -> DatasetLabels:
    """The checked labels of ``dataset`` (a dataset.json's content); ``where`` names it in every error."""
    labels = dataset.get("labels") if isinstance(dataset, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise DatasetLabelsError(f"{where}: expected a 'labels' object ({{name: value}}), got {labels!r}")
    entries = {str(k): _as_values(str(k), v, where) for k, v in labels.items() if k != "ignore"}
    ignore = _as_values("ignore", labels["ignore"], where)[0] if "ignore" in labels else None
    if entries.get("background") != (0,):
        raise DatasetLabelsError(
            f"{where}: label 'background' is {labels.get('background')!r}; expected 0 (nnU-Net's rule)"
        )
    if not any(len(v) > 1 for v in entries.values()):
        written = {name: v[0] for name, v in entries.items()}
        return DatasetLabels(tuple(sorted(set(written.values()))), written, ignore=ignore)
    regions = {name: v for name, v in entries.items() if set(v) != {0}}
    order = dataset.get("regions_class_order")
    if not isinstance(order, (list, tuple)) or len(order) != len(regions):
        raise DatasetLabelsError(
            f"{where}: regions_class_order is {order!r}; expected one label value per foreground region "
            f"({len(regions)}: {', '.join(f'{n} {list(r)}' for n, r in regions.items())})"
        )
    order = _as_values("regions_class_order", list(order), where)
    for i, (name, region) in enumerate(regions.items()):
        if order[i] not in region:
            raise DatasetLabelsError(
                f"{where}: regions_class_order[{i}] = {order[i]} is not a label of region {name!r} "
                f"{list(region)}; expected one of {list(region)} (the value nnU-Net writes where it predicts "
                f"{name!r})"
            )
    values = tuple(sorted({0, *order}))
    for name, region in regions.items():
        unknown = sorted(set(region) - set(values))
        if unknown:
            raise DatasetLabelsError(
                f"{where}: region {name!r} {list(region)} names label {unknown[0]}, which is not a label "
                f"value of this dataset; expected values in {list(values)} (background and regions_class_order)"
            )
    written = {"background": 0, **{name: v for name, v in zip(regions, order)}}
    return DatasetLabels(values, written, regions, order, ignore)
