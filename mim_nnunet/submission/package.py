"""Packaging: write predictions in the profile's format, then a deterministic zip and a manifest.

Owns the conversion of nnU-Net's output files into the challenge's files (label mapping, dtype, name, folder),
the zip, and the manifest (per-file sha256, model identity, package versions, command line). The conversion keeps
the geometry nnU-Net wrote: fixing geometry here would hide the errors that validation exists to catch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .profiles import Profile

MANIFEST_VERSION = 1
# A fixed timestamp makes the zip a function of its contents only (same predictions -> same zip sha256).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_PACKAGES = (
    "mim-nnunet",
    "nnunetv2",
    "torch",
    "SimpleITK",
    "numpy",
    "scipy",
    "dynamic-network-architectures",
    "surface-distance",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def label_lookup(label_map: dict[int, int], dtype: str) -> dict[int, int]:
    """Check that every mapped value fits the output dtype; return the map."""
    info = np.iinfo(dtype)
    for src, dst in label_map.items():
        if not info.min <= dst <= info.max:
            raise ValueError(f"label map {src} -> {dst}: {dst} does not fit {dtype}")
    return label_map


def convert_prediction(
    src: Path, dst: Path, profile: Profile, label_map: dict[int, int] | None = None
) -> None:
    """nnU-Net's segmentation file -> the challenge's file: mapped labels, profile dtype, same geometry."""
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)
    label_map = {**profile.label_map, **(label_map or {})}
    if label_map:
        out = arr.copy()
        for s, d in label_lookup(label_map, profile.dtype).items():
            out[arr == s] = d
        arr = out
    info = np.iinfo(profile.dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{src}: label values [{arr.min()}, {arr.max()}] do not fit {profile.dtype}")
    out_img = sitk.GetImageFromArray(arr.astype(profile.dtype))
    out_img.CopyInformation(img)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out_img, str(dst), useCompression=True)


def list_files(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_zip(root: str | Path, zip_path: str | Path, zip_root: str = "") -> list[str]:
    """Zip every file under ``root`` (relative paths, sorted, fixed timestamps), each under the folder
    ``zip_root`` when given (AMOS22 wants ``results/``). Returns the member names.

    The zip is written under a temporary name beside ``zip_path`` and renamed into place only when complete, so
    an interrupted run never leaves a truncated zip (or destroys the previous one).
    """
    root, zip_path = Path(root), Path(zip_path)
    names = list_files(root)
    prefix = f"{zip_root.strip('/')}/" if zip_root.strip("/") else ""
    members = []
    partial = zip_path.with_name(zip_path.name + ".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in names:
                info = zipfile.ZipInfo(prefix + name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, (root / name).read_bytes())
                members.append(prefix + name)
        os.replace(partial, zip_path)
    finally:
        partial.unlink(missing_ok=True)
    return members


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_manifest(
    predictions_dir: str | Path,
    profile: Profile,
    file_cases: dict[str, dict],
    models: list[dict],
    postprocessing: dict | None,
    zip_path: str | Path | None,
    validation: dict,
    argv: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """The manifest: enough to tell later exactly which models, code and command made which files."""
    predictions_dir = Path(predictions_dir)
    files = []
    for rel in list_files(predictions_dir):
        p = predictions_dir / rel
        files.append(
            {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size, **file_cases.get(rel, {})}
        )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": list(sys.argv if argv is None else argv),
        "profile": {
            "name": profile.name,
            "source": profile.source,
            "file": str(profile.path) if profile.path else None,
            "sha256": sha256_file(profile.path) if profile.path else None,
        },
        "models": models,
        "postprocessing": postprocessing,
        "packages": package_versions(),
        "platform": platform.platform(),
        "validation": validation,
        "files": files,
        "zip": None
        if zip_path is None
        else {"path": Path(zip_path).name, "sha256": sha256_file(zip_path), "root": profile.zip_root},
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(manifest: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(manifest, indent=2))
