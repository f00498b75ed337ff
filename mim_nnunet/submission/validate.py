"""Submission validation: every case has a prediction whose geometry, dtype and label values fit the challenge.

Owns the per-case checks and their report. Reads files with SimpleITK only; no nnU-Net, no pre-training code.
A violation is a precise sentence naming the file, the value found and the value expected, so that a failed run
can be fixed without opening an image viewer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .profiles import IMAGE_ENDINGS, Case, Profile

# NIfTI stores geometry as float32: a round trip through nnU-Net's writer moves values by ~1e-6 relative.
SPACING_RTOL = 1e-5
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-5

_INTEGER_PIXEL_IDS = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}


@dataclass
class CaseReport:
    case: str
    file: str
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class ValidationReport:
    profile: str
    predictions_dir: str
    allowed_labels: list[int]
    cases: list[CaseReport]
    unexpected_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases) and not self.unexpected_files

    @property
    def n_failed(self) -> int:
        return sum(not c.ok for c in self.cases)

    def lines(self) -> list[str]:
        out = [f"{c.file}: {e}" for c in self.cases for e in c.errors]
        out += [
            f"{f}: unexpected file (no test image maps to it)"
            if f.lower().endswith(IMAGE_ENDINGS)
            else f"{f}: unexpected file (not a prediction; remove it)"
            for f in self.unexpected_files
        ]
        return out

    def summary(self) -> str:
        head = (
            f"validation {'PASSED' if self.ok else 'FAILED'} (profile {self.profile}): "
            f"{len(self.cases) - self.n_failed}/{len(self.cases)} cases valid"
        )
        if self.unexpected_files:
            head += f", {len(self.unexpected_files)} unexpected file(s)"
        return "\n".join([head, *self.lines()])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _fmt(values) -> str:
    return str(tuple(round(float(v), 6) + 0.0 for v in values))  # + 0.0 turns -0.0 into 0.0


def check_geometry(pred: sitk.Image, ref: sitk.Image) -> list[str]:
    """Size, spacing, origin and direction of ``pred`` against ``ref`` (the input image)."""
    errors = []
    if pred.GetDimension() != ref.GetDimension():
        return [f"dimension {pred.GetDimension()} != image {ref.GetDimension()}"]
    if pred.GetSize() != ref.GetSize():
        errors.append(f"size {pred.GetSize()} != image {ref.GetSize()}")
    if not np.allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        errors.append(f"spacing {_fmt(pred.GetSpacing())} != image {_fmt(ref.GetSpacing())}")
    if not np.allclose(pred.GetOrigin(), ref.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_MM):
        errors.append(f"origin {_fmt(pred.GetOrigin())} != image {_fmt(ref.GetOrigin())}")
    if not np.allclose(pred.GetDirection(), ref.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        errors.append(f"direction {_fmt(pred.GetDirection())} != image {_fmt(ref.GetDirection())}")
    return errors


class _Header:
    """The geometry getters of an image read from its header alone (duck-types sitk.Image for check_geometry)."""

    def __init__(self, reader: sitk.ImageFileReader):
        self._r = reader

    def GetDimension(self):  # noqa: N802 - mirrors SimpleITK
        return self._r.GetDimension()

    def GetSize(self):  # noqa: N802
        return tuple(self._r.GetSize())

    def GetSpacing(self):  # noqa: N802
        return tuple(self._r.GetSpacing())

    def GetOrigin(self):  # noqa: N802
        return tuple(self._r.GetOrigin())

    def GetDirection(self):  # noqa: N802
        return tuple(self._r.GetDirection())


def read_header(path: Path) -> _Header:
    """An image's geometry without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _Header(reader)


def validate_case(pred_path: Path, case: Case, allowed: set[int]) -> list[str]:
    """Every violation of one case, as sentences without the file name (the report adds it)."""
    if not pred_path.is_file():
        return [f"missing: no prediction for case {case.case_id} (image {case.reference_image.name})"]
    try:
        pred = sitk.ReadImage(str(pred_path))
    except RuntimeError as e:
        return [f"unreadable: {str(e).strip().splitlines()[-1]}"]
    errors = []
    if pred.GetNumberOfComponentsPerPixel() != 1:
        errors.append(f"has {pred.GetNumberOfComponentsPerPixel()} components per voxel, expected 1")
    if pred.GetPixelID() not in _INTEGER_PIXEL_IDS:
        errors.append(f"dtype {pred.GetPixelIDTypeAsString()} is not an integer type")
    errors += check_geometry(pred, read_header(case.reference_image))
    values = np.unique(sitk.GetArrayViewFromImage(pred))
    if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        errors.append("label values are not whole numbers")
    bad = sorted({v.item() for v in values} - allowed)
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        errors.append(f"label values {{{shown}}} not in the profile's set {sorted(allowed)}")
    return errors


def validate_predictions(
    predictions_dir: str | Path,
    cases: list[Case],
    profile: Profile,
    allowed_labels: set[int],
    variables: dict[str, str] | None = None,
) -> ValidationReport:
    """Check every case's expected prediction under ``predictions_dir`` and flag files no case maps to."""
    predictions_dir = Path(predictions_dir)
    reports, expected = [], set()
    for case in cases:
        rel = profile.output_relpath(case, variables)
        expected.add(rel)
        reports.append(
            CaseReport(case.case_id, rel, validate_case(predictions_dir / rel, case, allowed_labels))
        )
    # Every file counts, not only images: a stray notes.txt or .DS_Store would travel in the zip too.
    found = (
        {p.relative_to(predictions_dir).as_posix() for p in predictions_dir.rglob("*") if not p.is_dir()}
        if predictions_dir.is_dir()
        else set()
    )
    return ValidationReport(
        profile=profile.name,
        predictions_dir=str(predictions_dir),
        allowed_labels=sorted(allowed_labels),
        cases=reports,
        unexpected_files=sorted(found - expected),
    )
