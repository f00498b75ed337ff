"""The classification dataset contract: layout, tables, the checks that name the file and the case, the folds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from classify_helpers import FLIP, PERMUTED, make_dataset, volume, write_image

from mim_nnunet.classify.dataset import DatasetError, load_dataset, resolve_dataset_folder
from mim_nnunet.classify.images import (
    fit_to_input,
    load_case,
    oriented_geometry,
    read_geometry,
    read_oriented,
)
from mim_nnunet.classify.splits import fold_cases, stratified_splits


@pytest.fixture(autouse=True)
def no_preprocessed_folder(monkeypatch):
    """The run's own folds unless a test sets a preprocessed folder (another test may have left the variable)."""
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)


@pytest.fixture
def ds_root(tmp_path):
    return make_dataset(tmp_path / "Dataset501_Cls", {"bright": 5, "dark": 5}, varied=False)


def test_a_valid_dataset_loads_with_its_classes(ds_root):
    ds = load_dataset(ds_root, folds=5)
    assert ds.classes == ["bright", "dark"]
    assert ds.class_counts() == {"bright": 5, "dark": 5}
    assert len(ds.cases) == 10 and all(len(ds.images[c]) == 1 for c in ds.cases)


def test_a_dataset_id_is_looked_up_in_nnunet_raw(ds_root, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(ds_root.parent))
    assert resolve_dataset_folder("501") == ds_root
    assert resolve_dataset_folder("Dataset501_Cls") == ds_root
    with pytest.raises(DatasetError, match="502"):
        resolve_dataset_folder("502")


def test_a_row_without_an_image_names_the_table_and_the_case(ds_root):
    (ds_root / "imagesTr" / "caseTr_003_0000.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset(ds_root)
    msg = str(e.value)
    assert "classesTr.csv" in msg and "caseTr_003" in msg and "\n" not in msg


def test_an_image_without_a_row_names_the_image_and_the_case(ds_root):
    write_image(ds_root / "imagesTr" / "stray_0000.nii.gz", volume("none", np.random.default_rng(0)))
    with pytest.raises(DatasetError) as e:
        load_dataset(ds_root)
    assert "stray_0000.nii.gz" in str(e.value) and "case stray" in str(e.value) and "classesTr.csv" in str(e.value)


def test_a_class_name_not_in_dataset_json_names_the_line_and_the_name(ds_root):
    table = ds_root / "classesTr.csv"
    table.write_text(table.read_text().replace("caseTr_002,bright", "caseTr_002,brigth"))
    with pytest.raises(DatasetError) as e:
        load_dataset(ds_root)
    assert "'brigth'" in str(e.value) and "caseTr_002" in str(e.value) and "classesTr.csv" in str(e.value)


def test_bad_headers_and_dataset_json_are_refused(ds_root):
    info = json.loads((ds_root / "dataset.json").read_text())
    (ds_root / "dataset.json").write_text(json.dumps({k: v for k, v in info.items() if k != "classes"}))
    with pytest.raises(DatasetError, match="dataset.json.*classes"):
        load_dataset(ds_root)
    (ds_root / "dataset.json").write_text(json.dumps(info))
    table = ds_root / "classesTr.csv"
    table.write_text(table.read_text().replace("case,class", "id,label"))
    with pytest.raises(DatasetError, match="header must be 'case,class'"):
        load_dataset(ds_root)


def test_a_class_with_fewer_cases_than_folds_is_refused_but_fold_all_trains(tmp_path):
    root = make_dataset(tmp_path / "d", {"bright": 5, "dark": 3}, varied=False)
    ds = load_dataset(root)
    with pytest.raises(DatasetError) as e:
        fold_cases(ds, "0", tmp_path / "run")
    assert "'dark' has 3 case(s), fewer than the 5 folds" in str(e.value) and "classesTr.csv" in str(e.value)
    assert not (tmp_path / "run" / "splits_final.json").exists()
    train, val, _ = fold_cases(ds, "all", tmp_path / "run")
    assert train == ds.cases and val == []


def test_splits_are_stratified_complete_and_kept_in_the_run(ds_root, tmp_path):
    ds = load_dataset(ds_root)
    run = tmp_path / "run"
    run.mkdir()
    train, val, source = fold_cases(ds, "2", run)
    splits = json.loads((run / "splits_final.json").read_text())
    assert source == str(run / "splits_final.json") and len(splits) == 5
    assert sorted(sum((s["val"] for s in splits), [])) == ds.cases  # every case validated exactly once
    for s in splits:
        assert {ds.labels[c] for c in s["val"]} == {0, 1}  # stratified: each fold sees both classes
        assert not set(s["train"]) & set(s["val"])
    assert (train, val) == (splits[2]["train"], splits[2]["val"])
    assert stratified_splits(ds.cases, [ds.labels[c] for c in ds.cases]) == splits  # deterministic


def test_the_preprocessed_folders_splits_are_used_when_present(ds_root, tmp_path, monkeypatch):
    ds = load_dataset(ds_root)
    pre = tmp_path / "pre" / ds_root.name
    pre.mkdir(parents=True)
    mine = [{"train": ds.cases[2:], "val": ds.cases[:2]}] * 5
    (pre / "splits_final.json").write_text(json.dumps(mine))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    train, val, source = fold_cases(ds, "0", tmp_path / "run")
    assert val == ds.cases[:2] and source == str(pre / "splits_final.json")


# ------------------------------------------------------------------------------------------------ images


def test_reorientation_brings_flipped_and_permuted_images_to_one_array(tmp_path):
    arr = volume("bright", np.random.default_rng(1), (20, 24, 28))
    # The same voxels stored with a flipped and with an x/y-permuted direction, the array laid out to match.
    write_image(tmp_path / "plain.nii.gz", arr, (2.0, 1.5, 1.0))
    write_image(tmp_path / "flip.nii.gz", arr[:, ::-1, ::-1], (2.0, 1.5, 1.0), FLIP)
    write_image(tmp_path / "perm.nii.gz", arr.transpose(0, 2, 1), (2.0, 1.0, 1.5), PERMUTED)
    plain, sp = read_oriented(tmp_path / "plain.nii.gz")
    for name in ("flip", "perm"):
        got, sp2 = read_oriented(tmp_path / f"{name}.nii.gz")
        assert sp2 == sp and np.array_equal(got, plain), name
        # the header-only geometry the planner uses agrees with the reoriented image
        assert read_geometry(tmp_path / f"{name}.nii.gz") == (list(plain.shape), sp)
    image = sitk.ReadImage(str(tmp_path / "perm.nii.gz"))
    assert oriented_geometry(image.GetSize(), image.GetSpacing(), image.GetDirection())[0] == [20, 24, 28]


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_any_pixel_type_becomes_the_same_float_input(tmp_path, dtype):
    arr = np.rint(volume("dark", np.random.default_rng(2), (16, 16, 16)))
    write_image(tmp_path / "x.nii.gz", arr, dtype=dtype)
    x = load_case([tmp_path / "x.nii.gz"], (1.5, 1.5, 1.5), (-1000, 1000), ["ct_window"])
    assert x.dtype == np.float32 and x.shape == (1, 16, 16, 16)
    assert np.allclose(x[0], (np.clip(arr, -1000, 1000) + 1000) / 2000, atol=1e-4)


def test_cases_are_resampled_then_padded_or_centre_cropped(tmp_path):
    write_image(tmp_path / "x.nii.gz", volume("none", np.random.default_rng(3), (10, 40, 60)), (3.0, 1.5, 0.75))
    x = load_case([tmp_path / "x.nii.gz"], (1.5, 1.5, 1.5), (-1000, 1000), ["ct_window"])
    assert x.shape == (1, 20, 40, 30)  # at 1.5 mm
    fit = fit_to_input(x, (32, 32, 32))
    assert fit.shape == (1, 32, 32, 32)
    assert np.array_equal(fit[0, 6:26, :, 1:31], x[0, :, 4:36, :])  # z, x padded centred (0 = air); y cropped
    assert fit[0, :6].max() == 0 and fit[0, :, :, 0].max() == 0
