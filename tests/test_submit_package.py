"""Packaging without a trained model: nnU-Net inference replaced by a stub that writes what nnU-Net would.

Checks: zip contents equal the manifest (names and sha256), the zip is deterministic, label mapping and dtype
are applied, and a validation failure leaves no zip and no manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.cli.submit import main
from mim_nnunet.submission import pipeline
from mim_nnunet.submission.package import write_zip

SPACING = (0.8, 0.8, 2.5)


def write(path, arr, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Test images, a model folder nnU-Net would accept on paper, and a stub for the inference step."""
    images = tmp_path / "imagesTs"
    images.mkdir()
    for i in range(3):
        write(images / f"synth_{i:03d}_0000.nii.gz", np.zeros((5, 6, 7), np.float32), origin=(i, 2.0, -1.0))
    model = tmp_path / "results" / "Dataset042_Toy" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    (model / "plans.json").write_text(
        json.dumps({"dataset_name": "Dataset042_Toy", "plans_name": "nnUNetPlans"})
    )
    (model / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "a": 1, "b": 2},
                "file_ending": ".nii.gz",
            }
        )
    )
    broken = set()

    def fake_inference(setup, cases, work_dir, *args, **kwargs):
        out = work_dir / "fake"
        out.mkdir(parents=True)
        for c in cases:
            if f"skip:{c.case_id}" in broken:
                continue
            ref = sitk.ReadImage(str(c.reference_image))
            seg = np.zeros(ref.GetSize()[::-1], np.uint8)
            seg[1:3, 1:3, 1:3] = 1
            seg[3, 3, 3:5] = 2
            img = sitk.GetImageFromArray(seg)
            img.CopyInformation(ref)
            if c.case_id in broken:
                img.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(img, str(out / f"{c.case_id}.nii.gz"))
        return out

    monkeypatch.setattr(pipeline, "run_inference", fake_inference)
    return images, model, broken


def zip_digests(path):
    with zipfile.ZipFile(path) as zf:
        return {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist()}


@pytest.mark.parametrize(
    "profile,expected", [("generic", "synth_001.nii.gz"), ("msd", "Task42_Toy/synth_001.nii.gz")]
)
def test_zip_contents_equal_manifest(setup, tmp_path, profile, expected):
    images, model, _ = setup
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "--profile", profile, "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert expected in listed and len(listed) == 3
    assert zip_digests(out / "submission.zip") == listed
    assert manifest["zip"]["sha256"] == hashlib.sha256((out / "submission.zip").read_bytes()).hexdigest()
    m = manifest["models"][0]
    assert (m["trainer"], m["plans"], m["configuration"], m["folds"]) == (
        "nnUNetTrainer",
        "nnUNetPlans",
        "3d_fullres",
        [0],
    )
    assert m["checkpoint_sha256"]["0"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["packages"]["nnunetv2"] and manifest["command_line"][0] == "mim_nnunet_submit"
    assert manifest["profile"]["name"] == profile and manifest["validation"]["ok"] is True


def test_label_map_and_dtype(setup, tmp_path):
    images, model, _ = setup
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "-o", str(out), "--label-map", "1:6,2:11"]) == 0
    img = sitk.ReadImage(str(out / "predictions" / "synth_000.nii.gz"))
    assert img.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(img)).tolist()) == {0, 6, 11}
    # A map that leaves the challenge's label set is caught by validation, and nothing is zipped.
    prof = tmp_path / "three_labels.json"
    prof.write_text(
        json.dumps(
            {
                "name": "three_labels",
                "source": "test",
                "input": {"pattern": "(?P<case>.+)_(?P<channel>\\d{4})\\.nii\\.gz"},
                "output": {"name": "{case}.nii.gz"},
                "labels": {"0": "bg", "1": "a", "2": "b"},
            }
        )
    )
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "-i",
                str(images),
                "-m",
                str(model),
                "-o",
                str(out2),
                "--label-map",
                "2:14",
                "--profile",
                str(prof),
            ]
        )
        == 1
    )
    assert not (out2 / "submission.zip").exists()


def test_map_labels_by_name(setup, tmp_path):
    images, model, _ = setup  # model labels: background 0, a 1, b 2
    prof = tmp_path / "named.json"
    spec = {
        "name": "named",
        "source": "test",
        "input": {"pattern": "(?P<case>.+)_(?P<channel>\\d{4})\\.nii\\.gz"},
        "output": {"name": "{case}.nii.gz"},
        "labels": {"0": "Background", "7": "B", "9": "A"},
    }
    prof.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert (
        main(
            [
                "-i",
                str(images),
                "-m",
                str(model),
                "-o",
                str(out),
                "--profile",
                str(prof),
                "--map-labels-by-name",
            ]
        )
        == 0
    )
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / "synth_000.nii.gz")))
    assert set(np.unique(seg).tolist()) == {0, 7, 9} and seg[1, 1, 1] == 9 and seg[3, 3, 3] == 7
    assert json.loads((out / "manifest.json").read_text())["inference"]["label_map"] == {
        "0": 0,
        "1": 9,
        "2": 7,
    }


def test_validation_failure_writes_no_zip(setup, tmp_path, capsys):
    images, model, broken = setup
    broken.add("synth_002")
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "-o", str(out)]) == 1
    assert not (out / "submission.zip").exists() and not (out / "manifest.json").exists()
    report = json.loads((out / "validation.json").read_text())
    assert report["ok"] is False
    assert "synth_002.nii.gz: spacing (1.0, 1.0, 1.0) != image (0.8, 0.8, 2.5)" in capsys.readouterr().out


def test_case_without_nnunet_output_is_reported_missing(setup, tmp_path, capsys):
    images, model, broken = setup
    broken.add("skip:synth_001")
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "-o", str(out)]) == 1
    assert not (out / "submission.zip").exists()
    assert "synth_001.nii.gz: missing: no prediction for case synth_001" in capsys.readouterr().out


def test_existing_output_needs_overwrite(setup, tmp_path):
    images, model, _ = setup
    out = tmp_path / "out"
    args = ["-i", str(images), "-m", str(model), "-o", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0


def test_zip_is_deterministic(tmp_path):
    root = tmp_path / "p"
    (root / "sub").mkdir(parents=True)
    (root / "b.nii.gz").write_bytes(b"bbb")
    (root / "sub" / "a.nii.gz").write_bytes(b"aaa")
    write_zip(root, tmp_path / "1.zip")
    (root / "b.nii.gz").touch()  # a new mtime must not change the zip
    write_zip(root, tmp_path / "2.zip")
    assert (tmp_path / "1.zip").read_bytes() == (tmp_path / "2.zip").read_bytes()
    assert zipfile.ZipFile(tmp_path / "1.zip").namelist() == ["b.nii.gz", "sub/a.nii.gz"]


def test_missing_model_is_a_clear_error(setup, tmp_path, capsys):
    images, model, _ = setup
    assert main(["-i", str(images), "-m", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    assert main(["-i", str(images), "-m", str(model), "-o", str(tmp_path / "o")]) == 2
    assert "no fold_*/checkpoint_final.pth" in capsys.readouterr().err


# ---- issue 11 ----------------------------------------------------------------------------------------------------
def tree_digest(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_submission_until_the_new_one_is_complete(setup, tmp_path, monkeypatch):
    images, model, broken = setup
    out = tmp_path / "out"
    args = ["-i", str(images), "-m", str(model), "-o", str(out)]
    assert main(args) == 0
    before = tree_digest(out)

    def crash(*a, **k):
        raise RuntimeError("GPU fell off")

    monkeypatch.setattr(pipeline, "run_inference", crash)
    with pytest.raises(RuntimeError, match="GPU fell off"):
        main([*args, "--overwrite"])
    assert tree_digest(out) == before  # nothing deleted, no staging folder left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predictions", "submission.zip", "manifest.json", "validation.json", "nnunet"]
    )


def test_overwrite_with_a_failing_run_keeps_the_old_submission(setup, tmp_path, capsys):
    images, model, broken = setup
    out = tmp_path / "out"
    args = ["-i", str(images), "-m", str(model), "-o", str(out)]
    assert main(args) == 0
    old_zip = (out / "submission.zip").read_bytes()
    broken.add("synth_002")
    assert main([*args, "--overwrite"]) == 1
    assert (out / "submission.zip").read_bytes() == old_zip
    assert json.loads((out / "failed_run" / "validation.json").read_text())["ok"] is False
    assert "failed_run/validation.json" in capsys.readouterr().err
    broken.clear()
    assert main([*args, "--overwrite", "--label-map", "1:2"]) == 0  # a complete run replaces it
    assert not (out / "failed_run").exists()
    assert zip_digests(out / "submission.zip") != {} and (out / "submission.zip").read_bytes() != old_zip


def test_zip_is_written_atomically(tmp_path, monkeypatch):
    root = tmp_path / "p"
    root.mkdir()
    for n in ("a.nii.gz", "b.nii.gz"):
        (root / n).write_bytes(n.encode() * 100)
    target = tmp_path / "submission.zip"
    write_zip(root, target)
    good = target.read_bytes()
    real = zipfile.ZipFile.writestr
    calls = []

    def fail_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail_second)
    with pytest.raises(OSError, match="disk full"):
        write_zip(root, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "submission.zip"]  # no partial file left


def test_amos_zip_holds_a_results_folder(tmp_path, monkeypatch):
    images = tmp_path / "imagesVa"
    images.mkdir()
    for i in (8, 13):
        write(images / f"amos_{i:04d}.nii.gz", np.zeros((5, 6, 7), np.float32))
    model = tmp_path / "Dataset218_AMOS2022" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"w")
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset218_AMOS2022"}))
    labels = {"background": 0, **{f"o{i}": i for i in range(1, 16)}}
    (model / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"})
    )

    def fake(setup, cases, work_dir, *a, **k):
        (work_dir / "f").mkdir(parents=True)
        for c in cases:
            ref = sitk.ReadImage(str(c.reference_image))
            seg = sitk.GetImageFromArray(np.full(ref.GetSize()[::-1], 6, np.uint8))
            seg.CopyInformation(ref)
            sitk.WriteImage(seg, str(work_dir / "f" / f"{c.case_id}.nii.gz"))
        return work_dir / "f"

    monkeypatch.setattr(pipeline, "run_inference", fake)
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "--profile", "amos22", "-o", str(out)]) == 0
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["results/amos_0008.nii.gz", "results/amos_0013.nii.gz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["zip"]["root"] == "results"
    assert {"results/" + f["path"]: f["sha256"] for f in manifest["files"]} == zip_digests(
        out / "submission.zip"
    )


def test_region_model_cyst_voxels_pass_and_map_by_name(setup, tmp_path, monkeypatch):
    """Dataset220_KiTS2023-style regions: nnU-Net writes 1, 3, 2; cyst voxels (3) are valid output."""
    images, model, _ = setup
    ds = json.loads((model / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    ds["regions_class_order"] = [1, 3, 2]
    (model / "dataset.json").write_text(json.dumps(ds))

    def fake(setup_, cases, work_dir, *a, **k):
        (work_dir / "f").mkdir(parents=True)
        for c in cases:
            ref = sitk.ReadImage(str(c.reference_image))
            seg = np.zeros(ref.GetSize()[::-1], np.uint8)
            seg[0:2] = 1
            seg[2:3] = 3
            seg[3:4] = 2
            img = sitk.GetImageFromArray(seg)
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(work_dir / "f" / f"{c.case_id}.nii.gz"))
        return work_dir / "f"

    monkeypatch.setattr(pipeline, "run_inference", fake)
    assert main(["-i", str(images), "-m", str(model), "-o", str(tmp_path / "g")]) == 0
    kits_images = tmp_path / "kits"
    kits_images.mkdir()
    for p in images.iterdir():
        i = int(p.name.split("_")[1])
        (kits_images / f"case_{400 + i:05d}_0000.nii.gz").write_bytes(p.read_bytes())
    out = tmp_path / "k"
    args = ["-i", str(kits_images), "-m", str(model), "--profile", "kits23", "-o", str(out)]
    assert main([*args, "--map-labels-by-name"]) == 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / "case_00400.nii.gz")))
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3} and seg[2].max() == 3


def test_var_cannot_send_files_outside_the_output(setup, tmp_path, capsys):
    images, model, _ = setup
    out = tmp_path / "deep" / "out"
    args = ["-i", str(images), "-m", str(model), "--profile", "msd", "-o", str(out)]
    assert main([*args, "--var", "msd_task=../../escaped"]) == 2
    assert "inside the output folder" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not out.exists()
