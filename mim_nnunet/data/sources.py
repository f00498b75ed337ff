"""Pre-training inputs: turn user specs (folders, globs, nnU-Net datasets, manifests) into a list of cases.

A spec is one of
- an image file (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr);
- a folder, searched recursively for such files; every sub-folder holding DICOM files is read as one case per
  DICOM series (SimpleITK/GDCM ``GetGDCMSeriesIDs``);
- a glob pattern (``**`` allowed), each match treated as a file or folder spec;
- an nnU-Net raw dataset, by id (``990``), full name (``Dataset990_MiMPhantom``) or name (``MiMPhantom``),
  looked up in ``$nnUNet_raw``: channel 0000 of ``imagesTr`` and ``imagesTs``; labels are ignored;
- a manifest: ``.txt`` (one spec per line, ``#`` comments, relative paths relative to the manifest) or ``.json``
  (a list of specs, or an object with a list under ``"images"``).

This module only finds files; it reads no pixels (reading and checking is :mod:`.preprocess`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
MANIFEST_SUFFIXES = (".txt", ".json")
# files that are never images nor DICOM (companions of .mhd/.nhdr, our own outputs, notes)
_NOT_DICOM = (
    ".raw",
    ".raw.gz",
    ".zraw",
    ".json",
    ".txt",
    ".md",
    ".csv",
    ".png",
    ".jpg",
    ".b2nd",
    ".npy",
    ".npz",
    ".pkl",
)


@dataclass(frozen=True)
class CaseSource:
    """One input volume: an image file, or a DICOM series (``files`` sorted by GDCM, ``series_uid`` set)."""

    case_id: str
    path: str  # the image file, or the folder of the DICOM series
    series_uid: str | None = None
    files: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "dicom" if self.series_uid is not None else "file"

    def describe(self) -> str:
        return f"{self.path} [DICOM series {self.series_uid}]" if self.series_uid else self.path


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _stem(name: str) -> str:
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _case_id(stem: str, key: str) -> str:
    """Readable and stable: the file stem (sanitised) + a hash of the absolute path, unique across folders."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.") or "case"
    return f"{slug[:60]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _file_case(path: Path) -> CaseSource:
    p = str(path.resolve())
    return CaseSource(_case_id(_stem(path.name), p), p)


def _dicom_cases(folder: Path) -> list[CaseSource]:
    """Every DICOM series directly inside ``folder`` (GDCM does not recurse)."""
    d = str(folder.resolve())
    reader = sitk.ImageSeriesReader()
    out = []
    for uid in reader.GetGDCMSeriesIDs(d) or ():
        files = tuple(reader.GetGDCMSeriesFileNames(d, uid))
        if files:
            out.append(CaseSource(_case_id(folder.name, f"{d}|{uid}"), d, uid, files))
    return out


def _folder_cases(root: Path) -> list[CaseSource]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        maybe_dicom = False
        for name in sorted(filenames):
            if _is_image(name):
                out.append(_file_case(Path(dirpath) / name))
            elif not name.startswith(".") and not name.lower().endswith(_NOT_DICOM):
                maybe_dicom = True  # .dcm, .ima or no suffix: let GDCM decide
        if maybe_dicom:
            out.extend(_dicom_cases(Path(dirpath)))
    return out


def _nnunet_dataset_folder(spec: str) -> Path | None:
    """The raw folder of an nnU-Net dataset given by id, ``DatasetXXX_Name`` or ``Name``; None if not one."""
    raw = os.environ.get("nnUNet_raw")
    if not raw or not Path(raw).is_dir():
        return None
    if re.fullmatch(r"\d{1,3}", spec):
        pattern = f"Dataset{int(spec):03d}_*"
    elif re.fullmatch(r"Dataset\d{3}_\w+", spec):
        pattern = spec
    elif re.fullmatch(r"\w+", spec):
        pattern = f"Dataset[0-9][0-9][0-9]_{spec}"
    else:
        return None
    hits = sorted(p for p in Path(raw).glob(pattern) if p.is_dir())
    if len(hits) > 1:
        raise ValueError(f"nnU-Net dataset spec {spec!r} is ambiguous in {raw}: {[h.name for h in hits]}")
    return hits[0] if hits else None


def _nnunet_cases(folder: Path) -> list[CaseSource]:
    """Channel 0000 of imagesTr and imagesTs (labels ignored)."""
    ending = ".nii.gz"
    dj = folder / "dataset.json"
    if dj.is_file():
        ending = json.loads(dj.read_text()).get("file_ending", ending)
    out = []
    for split in ("imagesTr", "imagesTs"):
        d = folder / split
        if d.is_dir():
            out.extend(_file_case(p) for p in sorted(d.glob(f"*_0000{ending}")))
    return out


def _manifest_entries(path: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = data.get("images")
        if not isinstance(data, list) or not all(isinstance(e, str) for e in data):
            raise ValueError(f"manifest {path}: expected a JSON list of paths (or {{'images': [...]}})")
        entries = data
    else:
        entries = [ln.strip() for ln in path.read_text().splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    return [e if os.path.isabs(e) else str(path.parent / e) for e in entries]


def _resolve_one(spec: str, depth: int = 0) -> list[CaseSource]:
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        return _folder_cases(p)
    if p.is_file():
        if _is_image(p.name):
            return [_file_case(p)]
        if p.suffix.lower() in MANIFEST_SUFFIXES:
            if depth > 4:
                raise ValueError(f"manifest {p}: manifests nested more than 4 deep")
            out: list[CaseSource] = []
            for entry in _manifest_entries(p):
                out.extend(_resolve_one(entry, depth + 1))
            return out
        dicom = _dicom_cases(p.parent) if not p.name.lower().endswith(_NOT_DICOM) else []
        hits = [c for c in dicom if c.files and str(p.resolve()) in c.files]
        if hits:
            return hits
        raise ValueError(
            f"{p}: not an image ({', '.join(IMAGE_SUFFIXES)}), manifest (.txt/.json) or DICOM file"
        )
    if glob.has_magic(spec):
        out = []
        for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            if Path(m).is_dir() or _is_image(m):
                out.extend(_resolve_one(m, depth))
        if not out:
            raise ValueError(f"glob {spec!r} matched no image or folder")
        return out
    ds = _nnunet_dataset_folder(spec)
    if ds is not None:
        return _nnunet_cases(ds)
    raise ValueError(
        f"input {spec!r} not found: not a file, folder, glob, manifest or nnU-Net dataset in $nnUNet_raw"
    )


def resolve_inputs(specs: list[str] | str) -> tuple[list[CaseSource], list[tuple[str, str]]]:
    """All cases of ``specs``, de-duplicated and sorted by (path, series), and ``(spec, reason)`` for each spec
    that gave nothing. Never raises for a bad spec: the caller decides (see ``preprocess_corpus``)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    found: dict[tuple[str, str | None], CaseSource] = {}
    problems: list[tuple[str, str]] = []
    for spec in specs:
        try:
            cases = _resolve_one(str(spec))
        except (ValueError, OSError, RuntimeError) as e:
            problems.append((str(spec), str(e)))
            continue
        if not cases:
            problems.append((str(spec), "no image file or DICOM series found"))
        for c in cases:
            found.setdefault((c.path, c.series_uid), c)
    return [found[k] for k in sorted(found, key=lambda k: (k[0], k[1] or ""))], problems
