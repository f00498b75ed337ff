"""Full submission runs with a real (tiny) trained nnU-Net model: generic and MSD profiles, ensemble +
find_best_configuration post-processing, evaluation, and the container entry script run locally.

The session fixture builds a synthetic labeled dataset (spheres = 1, cubes = 2), plans and preprocesses it with
nnU-Net's API and trains ``nnUNetTrainerSubmitTest`` (2 iterations, tests/submit_fixtures/trainers) on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from mim_nnunet.cli.submit import main

pytestmark = pytest.mark.slow

TRAINERS = Path(__file__).parent / "submit_fixtures" / "trainers"
REPO = Path(__file__).parents[1]
DATASET_ID, DATASET = 901, "Dataset901_SubmitTest"
TRAINER_FOLDER = "nnUNetTrainerSubmitTest__nnUNetPlans__3d_fullres"


def _case(rng, shape):
    img = rng.normal(0, 20, shape).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    idx = np.indices(shape)
    c, r = rng.integers(10, min(shape) - 10, 3), rng.integers(4, 7)
    seg[sum((i - ci) ** 2 for i, ci in zip(idx, c)) <= r * r] = 1
    o = rng.integers(2, min(shape) - 10, 3)
    box = seg[o[0] : o[0] + 8, o[1] : o[1] + 8, o[2] : o[2] + 8]
    box[box == 0] = 2
    img[seg == 1] += 100
    img[seg == 2] += 200
    return img, seg


def _save(arr, path, spacing=(1.5, 1.5, 2.0), origin=(0.0, 0.0, 0.0), direction=None):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    if direction is not None:
        im.SetDirection(direction)
    sitk.WriteImage(im, str(path))


def _env(root: Path) -> dict[str, str]:
    return {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": str(TRAINERS),
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(root, model folder, test images folder, test labels folder)."""
    root = tmp_path_factory.mktemp("submit_e2e")
    env = _env(root)
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
        Path(v).mkdir(parents=True, exist_ok=True)
    try:
        raw = root / "nnUNet_raw" / DATASET
        for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (raw / d).mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(4):
            img, seg = _case(rng, (32, 32, 32))
            _save(img, raw / "imagesTr" / f"synth_{i:03d}_0000.nii.gz")
            _save(seg, raw / "labelsTr" / f"synth_{i:03d}.nii.gz")
        # Test cases: another shape, an origin offset, and a flipped axis (geometry must survive the round trip).
        flip = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        for i, (origin, direction) in enumerate([((0.0, 0.0, 0.0), None), ((-10.5, 20.25, 3.0), flip)]):
            img, seg = _case(rng, (30, 34, 36))
            _save(
                img, raw / "imagesTs" / f"synth_{100 + i:03d}_0000.nii.gz", origin=origin, direction=direction
            )
            _save(seg, raw / "labelsTs" / f"synth_{100 + i:03d}.nii.gz", origin=origin, direction=direction)
        dataset_json = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "sphere": 1, "cube": 2},
            "numTraining": 4,
            "file_ending": ".nii.gz",
        }
        (raw / "dataset.json").write_text(json.dumps(dataset_json))

        import torch
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )
        from nnunetv2.run.run_training import run_training

        mp.setenv("nnUNet_n_proc_DA", "1")  # the planner calls torch.set_num_threads with it: 0 is refused
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=True, verbose=False)
        plan_experiment_dataset(DATASET_ID)
        preprocess_dataset(
            DATASET_ID, configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False
        )
        mp.setenv("nnUNet_n_proc_DA", "0")  # training: augmentation in the main process
        run_training(
            str(DATASET_ID), "3d_fullres", "all", "nnUNetTrainerSubmitTest", device=torch.device("cpu")
        )
    finally:
        mp.undo()
    model = root / "nnUNet_results" / DATASET / TRAINER_FOLDER
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    return root, model, raw / "imagesTs", raw / "labelsTs"


@pytest.fixture
def nnunet_env(trained, monkeypatch):
    for k, v in _env(trained[0]).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return trained


FAST = ["--device", "cpu", "--disable-tta", "-np", "0"]


def _zip_equals_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    with zipfile.ZipFile(out / "submission.zip") as zf:
        in_zip = {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist()}
    assert in_zip == {f["path"]: f["sha256"] for f in manifest["files"]}
    return manifest


def _geometry(path):
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def test_generic_full_run(nnunet_env, tmp_path):
    _, model, images, _ = nnunet_env
    out = tmp_path / "generic"
    assert main(["-i", str(images), "-m", str(model), "--profile", "generic", "-o", str(out), *FAST]) == 0
    preds = out / "predictions"
    assert sorted(p.name for p in preds.iterdir()) == ["synth_100.nii.gz", "synth_101.nii.gz"]
    manifest = _zip_equals_manifest(out)
    assert manifest["models"][0]["trainer"] == "nnUNetTrainerSubmitTest"
    assert manifest["models"][0]["folds"] == ["all"]
    for case in ("synth_100", "synth_101"):
        pred = preds / f"{case}.nii.gz"
        for got, want in zip(_geometry(pred), _geometry(images / f"{case}_0000.nii.gz")):
            np.testing.assert_allclose(got, want, atol=1e-4)
        img = sitk.ReadImage(str(pred))
        assert img.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1, 2}


def test_msd_full_run_then_check_only_and_evaluate(nnunet_env, tmp_path, capsys):
    _, model, images, labels = nnunet_env
    out = tmp_path / "msd"
    assert main(["-i", str(images), "-m", str(model), "--profile", "msd", "-o", str(out), *FAST]) == 0
    task = out / "predictions" / "Task901_SubmitTest"
    assert sorted(p.name for p in task.iterdir()) == ["synth_100.nii.gz", "synth_101.nii.gz"]
    manifest = _zip_equals_manifest(out)
    assert {f["path"] for f in manifest["files"]} == {
        f"Task901_SubmitTest/synth_10{i}.nii.gz" for i in (0, 1)
    }
    capsys.readouterr()
    # the same folder, validated on its own (labels and task folder from the model)
    assert (
        main(
            [
                "-i",
                str(images),
                "--profile",
                "msd",
                "--check-only",
                str(out / "predictions"),
                "-m",
                str(model),
            ]
        )
        == 0
    )
    assert "validation PASSED (profile msd): 2/2 cases valid" in capsys.readouterr().out
    # and scored against the references
    summary = tmp_path / "summary.json"
    assert main(["evaluate", "-p", str(task), "-r", str(labels), "--tolerance", "2", "-o", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["n_cases"] == 2 and [t["key"] for t in result["targets"]] == ["1", "2"]
    for m in ("Dice", "NSD"):
        v = result["foreground_mean"][m]
        assert v is None or 0.0 <= v <= 1.0
    # references against themselves: exactly 1
    assert (
        main(["evaluate", "-p", str(labels), "-r", str(labels), "--tolerance", "0", "-o", str(summary)]) == 0
    )
    assert json.loads(summary.read_text())["foreground_mean"] == {"Dice": 1.0, "NSD": 1.0}


def test_ensemble_with_find_best_configuration_postprocessing(nnunet_env, tmp_path):
    """inference_information.json as nnUNetv2_find_best_configuration writes it, naming an ensemble of two
    members (the same weights under two plans names) and a postprocessing.pkl that keeps the largest component."""
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    root, model, images, _ = nnunet_env
    results = tmp_path / "results" / DATASET
    results.mkdir(parents=True)
    shutil.copytree(model, results / TRAINER_FOLDER)
    shutil.copytree(model, results / "nnUNetTrainerSubmitTest__nnUNetPlansCopy__3d_fullres")
    pp_dir = results / "ensembles" / "ensemble___a___b___all"
    pp_dir.mkdir(parents=True)
    with open(pp_dir / "postprocessing.pkl", "wb") as f:
        fn = remove_all_but_largest_component_from_segmentation
        pickle.dump(([fn, fn], [{"labels_or_regions": 1}, {"labels_or_regions": 2}]), f)
    members = [
        {"configuration": "3d_fullres", "trainer": "nnUNetTrainerSubmitTest", "plans_identifier": p}
        for p in ("nnUNetPlans", "nnUNetPlansCopy")
    ]
    info = {
        "folds": ["all"],
        "dataset_name_or_id": DATASET,
        "best_model_or_ensemble": {
            # absolute path from another machine: must be found again under this results folder
            "postprocessing_file": f"/elsewhere/nnUNet_results/{DATASET}/ensembles/ensemble___a___b___all/postprocessing.pkl",
            "some_plans_file": "unused",
            "selected_model_or_models": members,
        },
    }
    (results / "inference_information.json").write_text(json.dumps(info))
    out = tmp_path / "ens"
    assert main(["-i", str(images), "-m", str(results), "-o", str(out), *FAST]) == 0
    manifest = _zip_equals_manifest(out)
    assert len(manifest["models"]) == 2 and manifest["postprocessing"]["file"].endswith("postprocessing.pkl")
    for case in ("synth_100", "synth_101"):
        member = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nnunet" / "model_0" / f"{case}.nii.gz")))
        ensembled = sitk.GetArrayFromImage(
            sitk.ReadImage(str(out / "nnunet" / "ensemble" / f"{case}.nii.gz"))
        )
        np.testing.assert_array_equal(member, ensembled)  # averaging identical members changes nothing
        final = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(final, fn(fn(ensembled, 1), 2))
        for label in (1, 2):  # nnU-Net's component removal counts 26-connected components
            assert ndimage.label(final == label, structure=np.ones((3, 3, 3)))[1] <= 1


def test_container_entry_runs_locally(nnunet_env, tmp_path):
    """FLARE's convention with a real model: `/bin/bash -c "sh predict.sh"` in a workspace holding inputs/."""
    root, model, images, _ = nnunet_env
    workspace = tmp_path / "workspace"  # stands for the image's /workspace
    (workspace / "inputs").mkdir(parents=True)
    for p in images.iterdir():
        shutil.copy(p, workspace / "inputs" / p.name)
    shutil.copy(REPO / "mim_nnunet" / "submission" / "container" / "predict.sh", workspace / "predict.sh")
    env = {
        **os.environ,
        **_env(root),
        "nnUNet_n_proc_DA": "0",
        "MIM_SUBMIT_ROOT": str(workspace),
        "MIM_SUBMIT_PYTHON": sys.executable,
        "MIM_SUBMIT_MODEL": str(model),
        "MIM_SUBMIT_PROFILE": "flare22",
        "MIM_SUBMIT_DEVICE": "cpu",
        "MIM_SUBMIT_ARGS": "--disable-tta -np 1",  # -np >= 1: nnU-Net's worker-process path
        "MIM_SUBMIT_MANIFEST": str(tmp_path / "manifest.json"),
    }
    for var in ("MIM_SUBMIT_INPUT", "MIM_SUBMIT_OUTPUT", "MIM_SUBMIT_WORK"):
        env.pop(var, None)
    proc = subprocess.run(
        ["/bin/bash", "-c", "sh predict.sh"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workspace / "outputs"
    assert sorted(p.name for p in out.iterdir()) == ["synth_100.nii.gz", "synth_101.nii.gz"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "flare22"
