"""Plain labels and regions of a dataset.json: the checks shared by planning, submission and evaluation, the
output heads the planner counts, and what each profile expects of a model's labels (docs/submission.md,
"Plain labels and regions"). Fast: no training, no inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.labels import DatasetLabelsError, dataset_labels
from mim_nnunet.submission.profiles import ProfileError, load_profile

KITS = {  # the phantoms' TASKS["kits"], as nnU-Net's Dataset220_KiTS2023
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
    "regions_class_order": [1, 3, 2],
    "file_ending": ".nii.gz",
}
ORGANS = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3},
          "file_ending": ".nii.gz"}  # fmt: skip


def with_labels(base: dict, **changes) -> dict:
    return {**base, **changes}


# ---- dataset.json ---------------------------------------------------------------------------------------------
def test_regions_read_as_nnunet_trains_and_exports_them():
    d = dataset_labels(KITS)
    assert d.has_regions and d.values == (0, 1, 2, 3)
    assert d.regions == {"kidney": (1, 2, 3), "masses": (2, 3), "tumor": (2,)}
    assert d.written == {"background": 0, "kidney": 1, "masses": 3, "tumor": 2}
    plain = dataset_labels(with_labels(ORGANS, labels={**ORGANS["labels"], "ignore": 4}))
    assert not plain.has_regions and plain.values == (0, 1, 2, 3) and plain.ignore == 4


@pytest.mark.parametrize(
    "labels, order, expected",
    [
        ({"background": 0, "kidney": [1, 7], "masses": [2, 3], "tumor": 2}, [1, 3, 2],
         "f.json: region 'kidney' [1, 7] names label 7, which is not a label value of this dataset; expected "
         "values in [0, 1, 2, 3] (background and regions_class_order)"),
        (KITS["labels"], [1, 3, 7],
         "f.json: regions_class_order[2] = 7 is not a label of region 'tumor' [2]; expected one of [2]"),
        (KITS["labels"], [1, 3], "f.json: regions_class_order is [1, 3]; expected one label value per foreground "
                                 "region (3: kidney [1, 2, 3], masses [2, 3], tumor [2])"),
        (KITS["labels"], None, "f.json: regions_class_order is None; expected one label value per"),
        ({"background": 1, "kidney": [1, 2]}, [1], "f.json: label 'background' is 1; expected 0"),
        ({"background": 0, "kidney": "one"}, None, "f.json: label 'kidney' is 'one'; expected a non-negative"),
    ],
)  # fmt: skip
def test_bad_labels_or_regions_are_one_line_errors_naming_the_file_and_the_value(labels, order, expected):
    with pytest.raises(DatasetLabelsError) as e:
        dataset_labels(with_labels(KITS, labels=labels, regions_class_order=order), "f.json")
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_planner_counts_the_heads_nnunet_builds():
    from mim_nnunet.nnunet.planner import segmentation_heads

    n, note = segmentation_heads(KITS)
    assert n == 3 and note.startswith("3 output heads, one sigmoid per region (1+2+3, 2+3, 2")
    assert len(KITS["labels"]) == 4  # what nnU-Net's own planner counts
    assert segmentation_heads(ORGANS) == (4, "4 output heads, softmax over the labels [0, 1, 2, 3] (nnU-Net's "
                                             "LabelManager)")  # fmt: skip
    assert segmentation_heads(with_labels(ORGANS, labels={**ORGANS["labels"], "ignore": 4}))[0] == 4


# ---- what a profile expects of a model --------------------------------------------------------------------------
PLAIN_KITS = with_labels(ORGANS, labels={"background": 0, "Kidney": 1, "tumor": 2, "cyst": 3})
OTHER_NUMBERING = with_labels(
    KITS, labels={"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 3}, regions_class_order=[1, 2, 3]
)


def test_region_model_fits_kits23_and_generic_but_not_plain_label_profiles():
    load_profile("kits23").check_model_labels(KITS)
    load_profile("generic").check_model_labels(KITS)
    load_profile("msd").check_model_labels(KITS)
    for name in ("flare22", "btcv", "amos22"):
        with pytest.raises(ProfileError) as e:
            load_profile(name).check_model_labels(KITS, where="m/dataset.json")
        msg = str(e.value)
        assert msg.startswith("m/dataset.json: a region-trained model (regions kidney [1, 2, 3], masses [2, 3], "
                              f"tumor [2]; writes [1, 2, 3]), but profile '{name}' expects plain labels")  # fmt: skip
    # an explicit --label-map for every written value is the user's word
    load_profile("flare22").check_model_labels(KITS, keep={1, 2, 3})


def test_kits23_takes_plain_labels_that_name_its_labels_and_refuses_others():
    load_profile("kits23").check_model_labels(PLAIN_KITS)
    with pytest.raises(ProfileError, match=r"model label 'liver' = 1, but profile 'kits23' \(scored on regions "
                                           r"of its labels\) expects 1 to be 'kidney'"):  # fmt: skip
        load_profile("kits23").check_model_labels(ORGANS)
    five = with_labels(ORGANS, labels={"background": 0, "kidney": 1, "lesion": 5})
    with pytest.raises(ProfileError, match="expects no label 5"):
        load_profile("kits23").check_model_labels(five)
    # a plain-label profile takes a plain model as numbered (its names are --map-labels-by-name's business)
    load_profile("flare22").check_model_labels(ORGANS)


def test_region_model_numbered_otherwise_needs_the_name_map():
    with pytest.raises(ProfileError, match="the model writes 2 where profile 'kits23' expects 3 \\(cyst"):
        load_profile("kits23").check_model_labels(OTHER_NUMBERING)
    assert load_profile("kits23").label_map_by_name(OTHER_NUMBERING) == {0: 0, 1: 1, 2: 3, 3: 2}


# ---- submit and evaluate refuse before writing ------------------------------------------------------------------
def _image(path, arr):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture
def region_model(tmp_path):
    """(test images, a region-trained model folder) whose checkpoint is never loaded."""
    images = tmp_path / "imagesTs"
    images.mkdir()
    _image(images / "case_00400_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
    model = tmp_path / "Dataset993_KiTSPhantom" / "nnUNetTrainerMiM__MiMPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"never loaded")
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset993_KiTSPhantom"}))
    (model / "dataset.json").write_text(json.dumps(KITS))
    return images, model


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_submit_refuses_a_region_model_for_a_plain_label_profile_before_writing(region_model, tmp_path, capsys):
    from mim_nnunet.cli.submit import main

    images, model = region_model
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "--profile", "flare22", "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"{model / 'dataset.json'}: a region-trained model" in line and "expects plain labels" in line
    assert not out.exists()
    # --check-only with the model: the same check, nothing written either
    pred = tmp_path / "pred"
    pred.mkdir()
    assert main(["-i", str(images), "--profile", "btcv", "--check-only", str(pred), "-m", str(model)]) == 2
    assert "profile 'btcv' expects plain labels" in _one_error_line(capsys)
    assert list(pred.iterdir()) == []


def test_submit_refuses_a_model_whose_regions_name_unknown_labels(region_model, tmp_path, capsys):
    from mim_nnunet.cli.submit import main

    images, model = region_model
    (model / "dataset.json").write_text(json.dumps(with_labels(KITS, regions_class_order=[1, 3, 7])))
    out = tmp_path / "out"
    assert main(["-i", str(images), "-m", str(model), "--profile", "kits23", "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {model / 'dataset.json'}: regions_class_order[2] = 7 is not a label of")
    assert not out.exists()


def _eval_folders(tmp_path, ref_values=(0, 1, 2), pred_values=(0, 1, 2)):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for folder, values in ((ref, ref_values), (pred, pred_values)):
        arr = np.zeros((4, 5, 6), np.uint8)
        for i, v in enumerate(values):
            arr[i] = v
        _image(folder / "case_00400.nii.gz", arr)
    return ref, pred


@pytest.mark.parametrize("side", ["reference", "prediction"])
def test_evaluate_names_the_file_and_the_value_outside_the_dataset_labels(tmp_path, capsys, side):
    from mim_nnunet.cli.submit import main

    ref, pred = _eval_folders(tmp_path, **{("ref_values" if side == "reference" else "pred_values"): (0, 1, 7)})
    bad = (ref if side == "reference" else pred) / "case_00400.nii.gz"
    summary = tmp_path / "s.json"
    args = ["evaluate", "-p", str(pred), "-r", str(ref), "--profile", "kits23", "-o", str(summary)]
    # a profile alone checks nothing: the challenge reads other values as background (as KiTS23 does)
    assert main(args) == 0
    summary.unlink()
    # the dataset.json beside the references (nnU-Net's raw layout): its values are 0 and regions_class_order
    (tmp_path / "dataset.json").write_text(json.dumps(KITS))
    assert main(args) == 2
    assert _one_error_line(capsys) == (
        f"error: {bad}: holds label value 7, which is not a label of {tmp_path / 'dataset.json'}; expected "
        "values in [0, 1, 2, 3]"
    )
    assert not summary.exists()
    # the one nnUNetv2_predict leaves beside the predictions comes first
    (pred / "dataset.json").write_text(json.dumps(ORGANS))
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1"]) == 2
    assert f"which is not a label of {pred / 'dataset.json'}; expected values in [0, 1, 2, 3]" in _one_error_line(
        capsys
    )


def test_evaluate_refuses_a_dataset_json_whose_regions_name_unknown_labels(tmp_path, capsys):
    from mim_nnunet.cli.submit import main

    ref, pred = _eval_folders(tmp_path)
    bad = tmp_path / "dataset.json"  # beside the references: nnU-Net's raw layout
    labels = {"background": 0, "kidney": [1, 7], "masses": [2, 3], "tumor": 2}
    bad.write_text(json.dumps(with_labels(KITS, labels=labels)))
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1"]) == 2
    assert _one_error_line(capsys).startswith(f"error: {bad}: region 'kidney' [1, 7] names label 7")
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1", "--dataset-json", str(bad)]) == 2
    assert "names label 7" in _one_error_line(capsys)
    # the same folders with a sound dataset.json score
    bad.write_text(json.dumps(KITS))
    assert main(["evaluate", "-p", str(pred), "-r", str(ref), "--tolerance", "1"]) == 0
