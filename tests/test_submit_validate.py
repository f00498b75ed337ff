"""Each validation failure class, made on purpose; the report names the file, the value and the expectation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.cli.submit import main
from mim_nnunet.submission.profiles import load_profile
from mim_nnunet.submission.validate import validate_predictions

SPACING, ORIGIN = (1.5, 1.5, 1.5), (10.0, -5.0, 3.0)


def write(path, arr, spacing=SPACING, origin=ORIGIN, direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    """Three test images (generic naming) and a valid prediction for each."""
    images, preds = tmp_path / "images", tmp_path / "preds"
    images.mkdir()
    preds.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write(images / f"case_{i:03d}_0000.nii.gz", rng.normal(size=(12, 14, 16)).astype(np.float32))
        seg = np.zeros((12, 14, 16), np.uint8)
        seg[3:6, 3:6, 3:6] = 1
        seg[7:9, 7:9, 7:9] = 2
        write(preds / f"case_{i:03d}.nii.gz", seg)
    return images, preds


def run(images, preds, labels=(0, 1, 2)):
    profile = load_profile("generic")
    return validate_predictions(preds, profile.collect_cases(images), profile, set(labels))


def test_valid_folder_passes(folders):
    report = run(*folders)
    assert report.ok, report.summary()
    assert [c.file for c in report.cases] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]


def only_error(report, file):
    assert not report.ok
    bad = [c for c in report.cases if not c.ok]
    assert [c.file for c in bad] == [file], report.summary()
    assert len(bad[0].errors) == 1, bad[0].errors
    return bad[0].errors[0]


def test_missing_prediction(folders):
    images, preds = folders
    (preds / "case_001.nii.gz").unlink()
    msg = only_error(run(images, preds), "case_001.nii.gz")
    assert msg.startswith("missing") and "case_001_0000.nii.gz" in msg


def test_wrong_size(folders):
    images, preds = folders
    write(preds / "case_002.nii.gz", np.zeros((12, 14, 15), np.uint8))
    assert only_error(run(images, preds), "case_002.nii.gz") == "size (15, 14, 12) != image (16, 14, 12)"


def test_wrong_spacing(folders):
    images, preds = folders
    write(preds / "case_000.nii.gz", np.zeros((12, 14, 16), np.uint8), spacing=(1.5, 1.5, 2.0))
    msg = only_error(run(images, preds), "case_000.nii.gz")
    assert msg == "spacing (1.5, 1.5, 2.0) != image (1.5, 1.5, 1.5)"


def test_wrong_origin(folders):
    images, preds = folders
    write(preds / "case_000.nii.gz", np.zeros((12, 14, 16), np.uint8), origin=(10.0, -5.0, 4.5))
    msg = only_error(run(images, preds), "case_000.nii.gz")
    assert msg == "origin (10.0, -5.0, 4.5) != image (10.0, -5.0, 3.0)"


def test_wrong_direction(folders):
    images, preds = folders
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    write(preds / "case_001.nii.gz", np.zeros((12, 14, 16), np.uint8), direction=flipped)
    msg = only_error(run(images, preds), "case_001.nii.gz")
    assert msg.startswith("direction (-1.0, 0.0, 0.0,") and "!= image (1.0, 0.0, 0.0," in msg


def test_label_outside_profile_set(folders):
    images, preds = folders
    seg = np.zeros((12, 14, 16), np.uint8)
    seg[0, 0, 0] = 7
    seg[1, 1, 1] = 2
    write(preds / "case_002.nii.gz", seg)
    assert (
        only_error(run(images, preds), "case_002.nii.gz")
        == "label values {7} not in the profile's set [0, 1, 2]"
    )
    lines = run(images, preds, labels=(0, 1)).lines()
    assert "case_002.nii.gz: label values {2, 7} not in the profile's set [0, 1]" in lines
    assert "case_000.nii.gz: label values {2} not in the profile's set [0, 1]" in lines


def test_float_dtype(folders):
    images, preds = folders
    write(preds / "case_001.nii.gz", np.ones((12, 14, 16), np.float32))
    msg = only_error(run(images, preds), "case_001.nii.gz")
    assert msg == "dtype 32-bit float is not an integer type"


def test_unreadable_file(folders):
    images, preds = folders
    (preds / "case_000.nii.gz").write_bytes(b"not an image")
    assert only_error(run(images, preds), "case_000.nii.gz").startswith("unreadable:")


def test_unexpected_file(folders):
    images, preds = folders
    write(preds / "case_999.nii.gz", np.zeros((12, 14, 16), np.uint8))
    report = run(images, preds)
    assert not report.ok and all(c.ok for c in report.cases)
    assert report.lines() == ["case_999.nii.gz: unexpected file (no test image maps to it)"]


def test_several_violations_are_all_reported(folders):
    images, preds = folders
    write(preds / "case_000.nii.gz", np.full((12, 14, 15), 9, np.float32), spacing=(1.0, 1.0, 1.0))
    report = run(images, preds)
    errors = report.cases[0].errors
    assert len(errors) == 4, errors  # dtype, size, spacing, labels
    assert sum(not c.ok for c in report.cases) == 1


def test_check_only_cli_exit_codes(folders, capsys):
    images, preds = folders
    args = ["-i", str(images), "--profile", "generic", "--check-only", str(preds), "--labels", "0,1,2"]
    assert main(args) == 0
    assert "validation PASSED" in capsys.readouterr().out
    write(preds / "case_001.nii.gz", np.zeros((12, 14, 16), np.uint8), spacing=(1.5, 1.5, 2.0))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "validation FAILED" in out
    assert "case_001.nii.gz: spacing (1.5, 1.5, 2.0) != image (1.5, 1.5, 1.5)" in out


def test_check_only_needs_a_label_set(folders, capsys):
    images, preds = folders
    assert main(["-i", str(images), "--profile", "generic", "--check-only", str(preds)]) == 2
    assert "label set from the model" in capsys.readouterr().err


def test_challenge_label_set_from_profile(tmp_path):
    """KiTS23 ships its own label set {0..3}: no --labels needed, 4 is rejected."""
    images, preds = tmp_path / "images", tmp_path / "preds"
    images.mkdir()
    preds.mkdir()
    write(images / "case_00400_0000.nii.gz", np.zeros((6, 6, 6), np.float32))
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[0, 0, :4] = [1, 2, 3, 4]
    write(preds / "case_00400.nii.gz", seg)
    assert main(["-i", str(images), "--profile", "kits23", "--check-only", str(preds)]) == 1
    seg[0, 0, 3] = 0
    write(preds / "case_00400.nii.gz", seg)
    assert main(["-i", str(images), "--profile", "kits23", "--check-only", str(preds)]) == 0


def test_check_only_reports_stray_non_image_files(folders, capsys):
    images, preds = folders
    (preds / "notes.txt").write_text("todo")
    (preds / ".DS_Store").write_bytes(b"\0")
    args = ["-i", str(images), "--profile", "generic", "--check-only", str(preds), "--labels", "0,1,2"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "notes.txt: unexpected file (not a prediction; remove it)" in out
    assert ".DS_Store: unexpected file" in out
