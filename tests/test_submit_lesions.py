"""Lesion-wise scores on small masks whose answer is known: a missed small lesion, a false positive, two lesions
merged in the prediction, the IoU threshold's edge, connectivity, the empty-mask conventions; and
`mim_nnunet_submit evaluate --lesions` on files (KiTS23 regions, the profile's convention, bad arguments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.cli.submit import main
from mim_nnunet.submission.evaluate import dice
from mim_nnunet.submission.lesions import LesionSpec, score_lesions

SPACING_ZYX = (2.0, 1.2, 0.8)
VOXEL_MM3 = 2.0 * 1.2 * 0.8


def box(shape, *slices):
    """A boolean mask with the given boxes (tuples of slices) set."""
    m = np.zeros(shape, bool)
    for s in slices:
        m[s] = True
    return m


BIG = np.s_[2:8, 2:8, 2:8]  # 216 voxels
SMALL = np.s_[14:16, 14:16, 14:16]  # 8 voxels
ELSEWHERE = np.s_[14:17, 2:5, 14:17]  # 27 voxels


def test_a_missed_small_lesion_halves_sensitivity_while_mask_dice_barely_moves():
    ref = box((20, 20, 20), BIG, SMALL)
    pred = box((20, 20, 20), BIG)
    s = score_lesions(ref, pred, SPACING_ZYX)
    assert (s["n_ref"], s["n_pred"], s["tp"], s["fn"], s["fp"]) == (2, 1, 1, 1, 0)
    assert s["sensitivity"] == 0.5
    assert s["lesion_dice"] == 0.5  # the missed lesion scores 0
    assert s["matched_dice"] == 1.0
    assert dice(ref, pred) > 0.98  # what a whole-mask Dice makes of the same miss
    assert s["reference_lesions"] == [
        {"volume_mm3": pytest.approx(216 * VOXEL_MM3), "detected": True, "iou": 1.0, "dice": 1.0},
        {"volume_mm3": pytest.approx(8 * VOXEL_MM3), "detected": False, "iou": 0.0, "dice": 0.0},
    ]


def test_a_false_positive_lesion_counts_and_scores_zero():
    ref = box((20, 20, 20), BIG)
    pred = box((20, 20, 20), BIG, ELSEWHERE)
    s = score_lesions(ref, pred, SPACING_ZYX)
    assert (s["n_ref"], s["n_pred"], s["tp"], s["fn"], s["fp"]) == (1, 2, 1, 0, 1)
    assert s["sensitivity"] == 1.0
    assert s["lesion_dice"] == 0.5  # (1 + 0) / (1 reference + 1 false positive)
    assert s["matched_dice"] == 1.0
    assert s["fp_volume_mm3"] == pytest.approx(27 * VOXEL_MM3)


def test_two_lesions_merged_in_the_prediction():
    # Two 4x4x4 lesions one voxel apart; the prediction fills both and the gap: 144 voxels, IoU 64/144 with each.
    a, b = np.s_[4:8, 4:8, 2:6], np.s_[4:8, 4:8, 7:11]
    ref = box((12, 12, 14), a, b)
    pred = box((12, 12, 14), np.s_[4:8, 4:8, 2:11])
    assert dice(ref, pred) == pytest.approx(2 * 128 / (128 + 144))  # 0.94: the merge is invisible to Dice
    s = score_lesions(ref, pred, SPACING_ZYX)  # IoU 0.44 < 0.5: neither lesion is detected, the blob is an FP
    assert (s["n_ref"], s["n_pred"], s["tp"], s["fn"], s["fp"]) == (2, 1, 0, 2, 1)
    assert s["sensitivity"] == 0.0 and s["lesion_dice"] == 0.0 and s["matched_dice"] == 0.0
    # At IoU 0.4 the blob detects one of them, never both (one-to-one).
    s = score_lesions(ref, pred, SPACING_ZYX, iou_threshold=0.4)
    assert (s["tp"], s["fn"], s["fp"]) == (1, 1, 0)
    pair_dice = 2 * 64 / (64 + 144)
    assert s["sensitivity"] == 0.5
    assert s["matched_dice"] == pytest.approx(pair_dice)
    assert s["lesion_dice"] == pytest.approx(pair_dice / 2)


def test_the_iou_threshold_is_inclusive():
    ref = box((10, 10, 12), np.s_[2:6, 2:6, 2:8])
    pred = box((10, 10, 12), np.s_[2:6, 2:6, 4:10])  # intersection 64, union 128
    assert score_lesions(ref, pred, SPACING_ZYX, iou_threshold=0.5)["tp"] == 1
    assert score_lesions(ref, pred, SPACING_ZYX, iou_threshold=0.51)["tp"] == 0


def test_connectivity_decides_what_one_lesion_is():
    m = box((6, 6, 6), np.s_[0:2, 0:2, 0:2], np.s_[2:4, 2:4, 2:4])  # two cubes touching at one corner
    assert score_lesions(m, m, SPACING_ZYX)["n_ref"] == 1  # default: 26-connected
    for conn in (6, 18):
        s = score_lesions(m, m, SPACING_ZYX, connectivity=conn)
        assert (s["n_ref"], s["tp"]) == (2, 2)
    with pytest.raises(ValueError, match=r"connectivity 8 for a 3D image: expected one of \(6, 18, 26\)"):
        score_lesions(m, m, SPACING_ZYX, connectivity=8)


@pytest.mark.parametrize("empty", ["nan", "one"])
def test_empty_masks_follow_the_convention(empty):
    none, one = np.zeros((8, 8, 8), bool), box((8, 8, 8), np.s_[2:4, 2:4, 2:4])
    both = score_lesions(none, none, SPACING_ZYX, empty=empty)
    for key in ("sensitivity", "lesion_dice", "matched_dice"):
        assert both[key] == 1.0 if empty == "one" else math.isnan(both[key]), key
    assert (both["n_ref"], both["n_pred"], both["fp"]) == (0, 0, 0)
    only_pred = score_lesions(none, one, SPACING_ZYX, empty=empty)
    assert (only_pred["fp"], only_pred["lesion_dice"], only_pred["matched_dice"]) == (1, 0.0, 0.0)
    if empty == "one":
        assert only_pred["sensitivity"] == 0.0  # one side empty scores 0
    else:
        assert math.isnan(only_pred["sensitivity"])  # nothing to detect
    only_ref = score_lesions(one, none, SPACING_ZYX, empty=empty)
    assert (only_ref["fn"], only_ref["sensitivity"], only_ref["lesion_dice"]) == (1, 0.0, 0.0)


def test_lesion_spec_rejects_bad_values():
    with pytest.raises(ValueError, match=r"threshold 0.0: expected 0 < threshold <= 1"):
        LesionSpec(("2",), iou_threshold=0.0)
    with pytest.raises(ValueError, match="connectivity 5"):
        LesionSpec(("2",), connectivity=5)


# ---- on files -------------------------------------------------------------------------------------------------
def write(path, arr):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(SPACING_ZYX[::-1])
    sitk.WriteImage(img, str(path))


def kits_pair(with_tumor: bool):
    """Kidney 1, cyst 3; with_tumor: a big and a small tumour 2 in the reference, the prediction missing the small
    one and adding a false tumour."""
    ref = np.zeros((14, 24, 24), np.uint8)
    ref[1:13, 2:22, 2:22] = 1
    ref[3:6, 14:18, 4:8] = 3
    pred = ref.copy()
    if with_tumor:
        ref[3:9, 4:10, 4:10] = 2
        ref[10:12, 16:18, 16:18] = 2
        pred[3:9, 4:10, 4:10] = 2
        pred[9:11, 4:7, 14:17] = 2
    return ref, pred


@pytest.fixture
def kits_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for name, with_tumor in (("case_00001.nii.gz", True), ("case_00002.nii.gz", False)):
        ref, pred = kits_pair(with_tumor)
        write(ref_dir / name, ref)
        write(pred_dir / name, pred)
    return ref_dir, pred_dir


def evaluate(tmp_path, *args):
    out = tmp_path / "summary.json"
    assert main(["evaluate", *args, "-o", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_lesions_on_kits23_regions_with_the_profiles_convention(kits_folders, tmp_path, capsys):
    ref, pred = kits_folders
    base = ["-p", str(pred), "-r", str(ref), "--profile", "kits23"]
    plain = evaluate(tmp_path, *base)
    assert plain["lesions"] is None
    res = evaluate(tmp_path, *base, "--lesions", "tumor,masses")  # a name and an alias
    assert res["mean"] == plain["mean"]  # Dice and NSD are untouched
    les = res["lesions"]
    assert les["targets"] == ["2", "2+3"] and les["iou_threshold"] == 0.5
    tumor = res["per_case"][0]["lesions"]["2"]
    assert (tumor["n_ref"], tumor["n_pred"], tumor["tp"], tumor["fn"], tumor["fp"]) == (2, 2, 1, 1, 1)
    assert tumor["lesion_dice"] == pytest.approx(1 / 3)
    mass = res["per_case"][0]["lesions"]["2+3"]  # big tumour, small tumour, cyst; the cyst is found
    assert (mass["tp"], mass["fn"], mass["fp"]) == (2, 1, 1)
    # case 2 has no tumour on either side: KiTS23's convention scores it 1
    assert res["per_case"][1]["lesions"]["2"]["sensitivity"] == 1.0
    m = les["mean"]["2"]
    assert m["sensitivity"] == pytest.approx(0.75) and m["pooled_sensitivity"] == pytest.approx(0.5)
    assert m["fp_per_case"] == 0.5 and m["lesion_dice"] == pytest.approx((1 / 3 + 1) / 2)
    out = capsys.readouterr().out
    assert "lesions (IoU >= 0.5" in out and "tumor (2)" in out and "mass (2+3)" in out
    # nnU-Net's convention instead: the lesion-free case has no sensitivity and leaves the means
    res = evaluate(tmp_path, *base, "--lesions", "2", "--empty", "nan")
    assert res["per_case"][1]["lesions"]["2"]["sensitivity"] is None
    assert res["lesions"]["mean"]["2"]["sensitivity"] == 0.5
    assert res["lesions"]["mean"]["2"]["lesion_dice"] == pytest.approx(1 / 3)


def test_cli_lesions_without_a_profile(kits_folders, tmp_path):
    ref, pred = kits_folders
    res = evaluate(
        tmp_path,
        "-p",
        str(pred),
        "-r",
        str(ref),
        "--labels",
        "1,2",
        "--tolerance",
        "1",
        "--lesions",
        "2",
        "--lesion-iou",
        "0.9",
    )
    assert res["lesions"]["mean"]["2"]["tp"] == 1  # the big tumour is exact: IoU 1
    assert res["per_case"][1]["lesions"]["2"]["lesion_dice"] is None  # no profile: nnU-Net's NaN rule


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--lesions", "liver"],
            "lesion target 'liver' is not among the scored targets: kidney_and_mass (1+2+3), "
            "mass (2+3), tumor (2)",
        ),
        (["--lesions", "2", "--lesion-iou", "0"], "lesion IoU threshold 0.0: expected 0 < threshold <= 1"),
        (["--lesion-iou", "0.3"], "--lesion-iou and --lesion-connectivity need --lesions TARGETS"),
        (
            ["--lesions", "2", "--lesion-connectivity", "4"],
            "case_00001.nii.gz: lesion connectivity 4 for a 3D image: expected one of (6, 18, 26)",
        ),
    ],
)
def test_cli_lesion_errors_name_the_value(kits_folders, capsys, extra, message):
    ref, pred = kits_folders
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--profile", "kits23", *extra]) == 2
    assert message in capsys.readouterr().err
