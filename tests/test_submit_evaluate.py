"""`mim_nnunet_submit evaluate` on files: analytic values through the CLI, agreement with nnU-Net's Dice,
missing cases and off-grid predictions rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.cli.submit import main

SPACING_XYZ = (0.8, 1.2, 2.0)  # SimpleITK order; the array axis 0 is z with 2.0 mm


def write(path, arr, spacing=SPACING_XYZ):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    """Two cases: label 1 is a 10^3 cube shifted by k=2 slices along z in the prediction; label 2 is identical
    in case a and absent from both files in case b."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for name, with_label2 in (("a.nii.gz", True), ("b.nii.gz", False)):
        r = np.zeros((24, 24, 24), np.uint8)
        p = np.zeros_like(r)
        r[6:16, 6:16, 6:16] = 1
        p[8:18, 6:16, 6:16] = 1
        if with_label2:
            r[18:22, 18:22, 18:22] = 2
            p[18:22, 18:22, 18:22] = 2
        write(ref / name, r)
        write(pred / name, p)
    return ref, pred


def test_cli_values_are_the_analytic_ones(folders, tmp_path, capsys):
    ref, pred = folders
    out = tmp_path / "summary.json"
    n, k = 10, 2
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "0.5", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["labels"] == [1, 2]
    nsd_below_voxel = (n - k) * (4 * n - 4) / (n**3 - (n - 2) ** 3)
    assert res["mean"]["1"]["Dice"] == pytest.approx((n - k) / n)
    assert res["mean"]["1"]["NSD"] == pytest.approx(nsd_below_voxel)
    assert res["mean"]["2"] == {"Dice": 1.0, "NSD": 1.0}  # case b has no label 2: null there, left out
    assert res["per_case"][1]["metrics"]["2"] == {"Dice": None, "NSD": None}
    assert res["foreground_mean"]["NSD"] == pytest.approx((nsd_below_voxel + 1) / 2)
    assert "NSD@0.5mm" in capsys.readouterr().out
    # the shift is k slices of 2 mm: at 4 mm every surface voxel is matched
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "4", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["mean"]["1"]["NSD"] == 1.0


def test_dice_agrees_with_nnunet(folders, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    ref, pred = folders
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1", "-o", str(ours)]) == 0
    compute_metrics_on_folder_simple(str(ref), str(pred), [1, 2], str(theirs), num_processes=1)
    a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
    for label in ("1", "2"):
        assert a["mean"][label]["Dice"] == pytest.approx(b["mean"][label]["Dice"])


def test_missing_prediction_and_off_grid_prediction_are_errors(folders, capsys):
    ref, pred = folders
    (pred / "b.nii.gz").unlink()
    args = ["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1"]
    assert main(args) == 2
    assert "have no prediction" in capsys.readouterr().err
    assert main([*args, "--allow-missing"]) == 0
    write(pred / "a.nii.gz", np.zeros((24, 24, 24)), spacing=(1.0, 1.0, 1.0))
    assert main([*args, "--allow-missing"]) == 2
    assert "a.nii.gz: prediction does not lie on the reference grid: spacing" in capsys.readouterr().err
