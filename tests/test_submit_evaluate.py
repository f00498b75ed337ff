"""`mim_nnunet_submit evaluate` on files, as the challenges score: KiTS23's regions and tolerances, FLARE's
per-organ tolerances, empty-mask rule, Dice floor and z-range crop, each compared with a re-statement of the
official procedure; nnU-Net's Dice without a profile; missing cases and off-grid predictions rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import surface_distance

from mim_nnunet.cli.submit import main
from mim_nnunet.submission.profiles import load_profile

SPACING_XYZ = (0.8, 1.2, 2.0)  # SimpleITK order; the array axis 0 is z with 2.0 mm
SPACING_ZYX = SPACING_XYZ[::-1]


def write(path, arr, spacing=SPACING_XYZ):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def file_spacing_zyx(path):
    """The spacing as the evaluators read it back (NIfTI stores float32: 0.8 becomes 0.800000011920929)."""
    return sitk.ReadImage(str(path)).GetSpacing()[::-1]


def lib_nsd(ref, pred, spacing_zyx, tol):
    dist = surface_distance.compute_surface_distances(ref, pred, tuple(spacing_zyx))
    return surface_distance.compute_surface_dice_at_tolerance(dist, tol)


def plain_dice(r, p):
    return 2 * np.count_nonzero(r & p) / (np.count_nonzero(r) + np.count_nonzero(p))


def evaluate(tmp_path, *args):
    out = tmp_path / "summary.json"
    assert main(["evaluate", *args, "-o", str(out)]) == 0
    return json.loads(out.read_text())


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


def test_cli_values_and_empty_conventions(folders, tmp_path, capsys):
    ref, pred = folders
    res = evaluate(tmp_path, "-p", str(pred), "-r", str(ref), "--tolerance", "1")
    assert [t["key"] for t in res["targets"]] == ["1", "2"]
    r = np.zeros((24, 24, 24), bool)
    p = np.zeros_like(r)
    r[6:16, 6:16, 6:16] = True
    p[8:18, 6:16, 6:16] = True
    assert res["mean"]["1"]["Dice"] == pytest.approx(0.8)
    assert res["mean"]["1"]["NSD"] == pytest.approx(lib_nsd(r, p, SPACING_ZYX, 1.0))
    # nnU-Net's convention: case b has no label 2 on either side -> null there, left out of the mean.
    assert res["per_case"][1]["metrics"]["2"] == {"Dice": None, "NSD": None}
    assert res["mean"]["2"] == {"Dice": 1.0, "NSD": 1.0}
    assert "NSD" in capsys.readouterr().out
    # The challenges' convention: both empty scores 1 and counts.
    res = evaluate(tmp_path, "-p", str(pred), "-r", str(ref), "--tolerance", "1", "--empty", "one")
    assert res["per_case"][1]["metrics"]["2"] == {"Dice": 1.0, "NSD": 1.0}
    # the shift is k slices of 2 mm: at 4 mm every surface element is matched
    res = evaluate(tmp_path, "-p", str(pred), "-r", str(ref), "--tolerance", "4")
    assert res["mean"]["1"]["NSD"] == pytest.approx(1.0)


def test_targets_are_named_from_dataset_json_or_profile(folders, tmp_path, capsys):
    ref, pred = folders
    args = ["-p", str(pred), "-r", str(ref), "--tolerance", "1"]
    res = evaluate(tmp_path, *args)  # no names known: the values
    assert [t["name"] for t in res["targets"]] == ["1", "2"]
    assert "label names" not in capsys.readouterr().out
    # nnUNetv2_predict leaves the model's dataset.json beside its predictions
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    res = evaluate(tmp_path, *args)
    assert [(t["key"], t["name"]) for t in res["targets"]] == [("1", "liver"), ("2", "spleen")]
    out = capsys.readouterr().out
    assert "liver (1)" in out and "spleen (2)" in out and f"label names from {pred / 'dataset.json'}" in out
    # a profile's label names come before a dataset.json found by itself; regions are named by their values
    res = evaluate(tmp_path, *args, "--profile", "btcv", "--labels", "1,2,1+2")
    assert [t["name"] for t in res["targets"]] == ["spleen", "right kidney", "1+2"]
    # an explicit --dataset-json wins; one that is not a dataset.json is an error naming it
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"labels": {"background": 0, "kidneys": [1, 2], "cyst": 2}, "regions_class_order": [1, 2]}))
    res = evaluate(tmp_path, *args, "--profile", "btcv", "--labels", "1+2,2", "--dataset-json", str(other))
    assert [t["name"] for t in res["targets"]] == ["kidneys", "cyst"]
    other.write_text("[1, 2]")
    assert main(["evaluate", *args, "--dataset-json", str(other)]) == 2
    assert f"{other}: expected a dataset.json with a 'labels' object" in capsys.readouterr().err


def test_dice_agrees_with_nnunet(folders, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    ref, pred = folders
    theirs = tmp_path / "theirs.json"
    a = evaluate(tmp_path, "-p", str(pred), "-r", str(ref), "--tolerance", "1")
    compute_metrics_on_folder_simple(str(ref), str(pred), [1, 2], str(theirs), num_processes=1)
    b = json.loads(theirs.read_text())
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


def test_tolerance_is_required_without_a_profile(folders, capsys):
    ref, pred = folders
    assert main(["evaluate", "-p", str(pred), "-r", str(ref)]) == 2
    assert "no NSD tolerance: pass --tolerance" in capsys.readouterr().err
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--profile", "btcv"]) == 2
    assert "has no evaluation block" in capsys.readouterr().err


# ---- KiTS23 -------------------------------------------------------------------------------------------------
KITS_HECS = {  # kits23/configuration/labels.py
    "1+2+3": ((1, 2, 3), 1.0330772532390826),
    "2+3": ((2, 3), 1.1328796488598762),
    "2": ((2,), 1.1498198361434828),
}


def kits_case(with_tumor: bool):
    seg = np.zeros((14, 20, 20), np.uint8)
    seg[2:12, 3:17, 3:17] = 1
    seg[5:9, 5:10, 5:10] = 3  # cyst
    if with_tumor:
        seg[4:10, 11:16, 10:15] = 2
    return seg


def kits_reference_metrics(ref, pred, spacing_zyx):
    """kits23/evaluation/metrics.py compute_metrics_for_label, re-stated: per HEC, empties first."""
    out = {}
    for key, (labels, tol) in KITS_HECS.items():
        r, p = np.isin(ref, labels), np.isin(pred, labels)
        if not r.any() and not p.any():
            out[key] = (1.0, 1.0)
        elif not r.any() or not p.any():
            out[key] = (0.0, 0.0)
        else:
            out[key] = (plain_dice(r, p), lib_nsd(r, p, spacing_zyx, tol))
    return out


def test_kits23_regions_tolerances_and_empties(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    cases = {}
    # case 1: the cyst predicted as tumor (mass region perfect, tumor region wrong), tumor shifted one slice
    r1 = kits_case(True)
    p1 = r1.copy()
    p1[p1 == 3] = 2
    p1[p1 == 2] = 0
    p1[np.roll(r1 == 2, 1, axis=0)] = 2
    p1[r1 == 3] = 2
    cases["case_00001.nii.gz"] = (r1, p1)
    # case 2: no tumor in the reference nor the prediction -> tumor scores 1/1 (both empty)
    r2 = kits_case(False)
    cases["case_00002.nii.gz"] = (r2, r2.copy())
    # case 3: a tumor predicted where the reference has none -> tumor 0/0
    r3 = kits_case(False)
    p3 = r3.copy()
    p3[2:4, 3:6, 3:6] = 2
    cases["case_00003.nii.gz"] = (r3, p3)
    for name, (r, p) in cases.items():
        write(ref / name, r)
        write(pred / name, p)
    res = evaluate(tmp_path, "-p", str(pred), "-r", str(ref), "--profile", "kits23")
    assert [(t["key"], t["name"], t["tolerance_mm"]) for t in res["targets"]] == [
        ("1+2+3", "kidney_and_mass", 1.0330772532390826),
        ("2+3", "mass", 1.1328796488598762),
        ("2", "tumor", 1.1498198361434828),
    ]
    sp = file_spacing_zyx(ref / "case_00001.nii.gz")
    expected = {name: kits_reference_metrics(r, p, sp) for name, (r, p) in cases.items()}
    for c in res["per_case"]:
        for key, (d, n) in expected[c["case"]].items():
            assert c["metrics"][key]["Dice"] == pytest.approx(d, abs=1e-12), (c["case"], key)
            assert c["metrics"][key]["NSD"] == pytest.approx(n, abs=1e-12), (c["case"], key)
    assert expected["case_00002.nii.gz"]["2"] == (1.0, 1.0) and expected["case_00003.nii.gz"]["2"] == (0, 0)
    # KiTS averages over all cases (the empty ones included) and all HECs.
    mean_nsd = np.mean([n for e in expected.values() for _, n in e.values()])
    assert res["foreground_mean"]["NSD"] == pytest.approx(mean_nsd, abs=1e-12)
    # The same regions by hand: '+'-joined labels with one tolerance.
    res2 = evaluate(
        tmp_path, "-p", str(pred), "-r", str(ref), "--labels", "1+2+3,2+3,2", "--tolerance", "1.1"
    )
    assert res2["mean"]["2+3"]["Dice"] == pytest.approx(res["mean"]["2+3"]["Dice"])
    assert {t["tolerance_mm"] for t in res2["targets"]} == {1.1}


# ---- FLARE22 / FLARE23 ------------------------------------------------------------------------------------------
def flare_reference_metrics(ref_zyx, pred_zyx, spacing_zyx, tolerances, floor):
    """FLARE22/23_DSC_NSD_Eval.py re-stated on nibabel-ordered arrays (x, y, z) with the header zooms."""
    ref, pred = ref_zyx.transpose(2, 1, 0), pred_zyx.transpose(2, 1, 0)
    zooms = tuple(spacing_zyx[::-1])
    out = {}
    for i, tol in tolerances.items():
        if not (ref == i).any() and not (pred == i).any():
            out[i] = (1.0, 1.0)
            continue
        if not (ref == i).any() or not (pred == i).any():
            out[i] = (0.0, 0.0)
            continue
        if i in (5, 6, 10):  # aorta, IVC, esophagus: the labelled slices of the ground truth, [min, max)
            z = np.where(ref == i)[2]
            r, p = ref[:, :, z.min() : z.max()] == i, pred[:, :, z.min() : z.max()] == i
        else:
            r, p = ref == i, pred == i
        d = plain_dice(r, p)
        n = 0.0 if d < floor else lib_nsd(r, p, zooms, tol)
        out[i] = (d, n)
    return out


FLARE_TOL = {1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3}


def flare_case():
    ref = np.zeros((16, 24, 24), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:12, 2:10, 2:10] = 1  # liver
    pred[3:13, 3:11, 2:10] = 1
    ref[3:8, 14:17, 14:17] = 5  # aorta on slices 3..7
    pred[0:13, 14:17, 14:17] = 5  # predicted over 0..12: outside the reference's range it is not scored
    ref[4:9, 18:22, 2:6] = 12  # duodenum, shifted by 1 slice
    pred[5:10, 18:22, 2:6] = 12
    ref[10:14, 18:21, 18:21] = 4  # pancreas, predicted mostly elsewhere: Dice 0.15
    pred[10:14, 18:21, 18:21] = 0
    pred[13:14, 18:21, 18:21] = 4
    pred[0:3, 0:4, 20:24] = 4
    ref[12:14, 12:14, 2:4] = 14  # lesion (FLARE23)
    pred[12:14, 12:14, 3:5] = 14
    return ref, pred


@pytest.mark.parametrize("profile,floor", [("flare22", 0.2), ("flare23", 0.1)])
def test_flare_rules_match_the_official_procedure(tmp_path, profile, floor):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref, pred = flare_case()
    write(ref_dir / "FLARETs_0001.nii.gz", ref)
    write(pred_dir / "FLARETs_0001.nii.gz", pred)
    res = evaluate(tmp_path, "-p", str(pred_dir), "-r", str(ref_dir), "--profile", profile)
    tolerances = dict(FLARE_TOL)
    if profile == "flare23":
        tolerances[14] = 2
    assert {int(t["key"]): t["tolerance_mm"] for t in res["targets"]} == tolerances
    sp = file_spacing_zyx(ref_dir / "FLARETs_0001.nii.gz")
    expected = flare_reference_metrics(ref, pred, sp, tolerances, floor)
    got = res["per_case"][0]["metrics"]
    for i, (d, n) in expected.items():
        assert got[str(i)]["Dice"] == pytest.approx(d, abs=1e-12), i
        assert got[str(i)]["NSD"] == pytest.approx(n, abs=1e-12), i
    assert got["5"]["Dice"] == 1.0  # z-range crop: the long aorta prediction is not penalised
    assert got["2"] == {"Dice": 1.0, "NSD": 1.0}  # right kidney absent on both sides
    pancreas = got["4"]
    assert 0.1 <= pancreas["Dice"] < 0.2
    assert (pancreas["NSD"] == 0.0) == (
        profile == "flare22"
    )  # FLARE22 zeroes NSD below Dice 0.2, FLARE23 0.1
    organs = [str(i) for i in range(1, 14)]
    assert res["foreground_mean"]["NSD"] == pytest.approx(np.mean([got[k]["NSD"] for k in organs]))
    if profile == "flare23":
        assert [t["in_mean"] for t in res["targets"] if t["key"] == "14"] == [False]


def test_profiles_carry_the_official_tolerances():
    kits = load_profile("kits23").evaluation
    assert {t.name: (t.labels, t.tolerance_mm) for t in kits.targets} == {
        "kidney_and_mass": ((1, 2, 3), 1.0330772532390826),
        "mass": ((2, 3), 1.1328796488598762),
        "tumor": ((2,), 1.1498198361434828),
    }
    assert kits.empty == "one" and kits.nsd_zero_below_dice is None
    f22 = load_profile("flare22").evaluation
    assert {t.labels[0]: t.tolerance_mm for t in f22.targets} == FLARE_TOL
    assert {t.labels[0] for t in f22.targets if t.reference_z_range} == {5, 6, 10}
    f23 = load_profile("flare23").evaluation
    assert {t.labels[0]: t.tolerance_mm for t in f23.targets} == {**FLARE_TOL, 14: 2}
    assert f23.mean_excludes == ("tumor",) and f23.nsd_zero_below_dice == 0.1
