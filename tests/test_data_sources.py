"""Input specs: folders (recursive), globs, DICOM series, nnU-Net datasets, manifests; stable ids, no duplicates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.data.cache import case_paths, read_volume
from mim_nnunet.data.phantoms import make_phantom
from mim_nnunet.data.preprocess import PreprocessSettings, preprocess_corpus, read_case
from mim_nnunet.data.sources import resolve_inputs


def _write_dicom_series(image: sitk.Image, folder, series_uid: str) -> None:
    """One CT slice per file, with the tags a reader needs to stack and place the slices."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    common = [
        ("0008|0060", "CT"),
        ("0010|0010", "Phantom^Test"),
        ("0020|000d", series_uid.rsplit(".", 1)[0]),
        ("0020|000e", series_uid),
        (
            "0020|0037",
            "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3]),
        ),  # row, column cosines
        ("0028|1050", "40"),
        ("0028|1051", "400"),
    ]
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData(
            "0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        )
        sl.SetMetaData("0018|0050", f"{image.GetSpacing()[2]:.6f}")
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}_{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path):
    image, _ = make_phantom(
        21, shape_mm=(80.0, 72.0, 64.0), spacing=(1.6, 1.6, 2.0), direction=np.eye(3), labels=False
    )
    _write_dicom_series(image, tmp_path / "patient" / "study" / "ct", "1.2.826.0.1.3680043.2.1125.1.1")
    other, _ = make_phantom(
        22, shape_mm=(70.0, 70.0, 56.0), spacing=(1.6, 1.6, 2.0), direction=np.eye(3), labels=False
    )
    _write_dicom_series(
        other, tmp_path / "patient" / "study" / "ct", "1.2.826.0.1.3680043.2.1125.1.2"
    )  # same folder
    sources, problems = resolve_inputs([str(tmp_path / "patient")])
    assert not problems
    assert len(sources) == 2 and {s.kind for s in sources} == {"dicom"}
    assert len({s.case_id for s in sources}) == 2
    by_uid = {s.series_uid: s for s in sources}
    src = by_uid["1.2.826.0.1.3680043.2.1125.1.1"]
    assert len(src.files) == image.GetDepth()
    arr, props = read_case(src, PreprocessSettings())
    assert np.array_equal(arr, sitk.GetArrayFromImage(image).astype(np.float32))
    assert props["spacing"] == pytest.approx([2.0, 1.6, 1.6], abs=1e-4)
    report = preprocess_corpus([str(tmp_path / "patient")], tmp_path / "cache", num_workers=0, progress=False)
    assert len(report.cases) == 2 and not report.skipped


def test_folder_glob_dedup_and_stable_ids(tmp_path, phantom_corpus):
    root = tmp_path / "data"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(phantom_corpus[0], root / "x.nii.gz")
    shutil.copy(phantom_corpus[1], root / "a" / "b" / "x.nii.gz")  # same name, other folder
    img = sitk.ReadImage(str(phantom_corpus[2]))
    sitk.WriteImage(img, str(root / "a" / "y.mha"))
    sitk.WriteImage(img, str(root / "a" / "z.nrrd"))
    sitk.WriteImage(img, str(root / "a" / "w.mhd"))  # + w.raw, which is not a case
    (root / "notes.txt").write_text("not a manifest of this corpus")
    sources, problems = resolve_inputs([str(root)])
    assert not problems
    names = sorted(s.path.rsplit("/", 1)[-1] for s in sources)
    assert names == ["w.mhd", "x.nii.gz", "x.nii.gz", "y.mha", "z.nrrd"]
    assert len({s.case_id for s in sources}) == 5
    again, _ = resolve_inputs([str(root / "**" / "*.nii.gz"), str(root), str(root / "x.nii.gz")])
    assert [s.case_id for s in again] == [s.case_id for s in sources]  # stable and de-duplicated
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    assert resolve_inputs([str(root / "*.nope")])[1][0][1].startswith("glob")


def test_nnunet_dataset_by_id_and_name(phantom_dataset, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(phantom_dataset.parent))
    for spec in ("990", "Dataset990_MiMPhantom", "MiMPhantom"):
        sources, problems = resolve_inputs([spec])
        assert not problems, problems
        names = sorted(s.path.rsplit("/", 1)[-1] for s in sources)
        assert names == [
            "MiMPhantom_tr000_0000.nii.gz",
            "MiMPhantom_tr001_0000.nii.gz",
            "MiMPhantom_ts000_0000.nii.gz",
        ]
        assert not any("labels" in s.path for s in sources)
    assert resolve_inputs(["991"])[1] and "not found" in resolve_inputs(["991"])[1][0][1]


def test_manifests(tmp_path, phantom_corpus):
    txt = tmp_path / "list.txt"
    shutil.copy(phantom_corpus[0], tmp_path / "rel.nii.gz")
    txt.write_text(f"# corpus\nrel.nii.gz\n\n{phantom_corpus[1]}\n")
    js = tmp_path / "list.json"
    js.write_text(json.dumps([str(phantom_corpus[1]), str(phantom_corpus[2])]))
    js2 = tmp_path / "obj.json"
    js2.write_text(json.dumps({"images": [str(phantom_corpus[2])]}))
    sources, problems = resolve_inputs([str(txt), str(js), str(js2)])
    assert not problems
    assert sorted(s.path.rsplit("/", 1)[-1] for s in sources) == [
        "case_1.nii.gz",
        "case_2.nii.gz",
        "rel.nii.gz",
    ]
    report = preprocess_corpus([str(txt)], tmp_path / "cache", num_workers=0, progress=False)
    assert len(report.cases) == 2
    assert read_volume(case_paths(tmp_path / "cache", report.cases[0])[0]).ndim == 3
