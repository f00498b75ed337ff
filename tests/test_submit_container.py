"""The container pieces without Docker: the entry script (inference stubbed) and the Dockerfile's consistency
with the repository and with the variables the entry script reads. The entry script with a real model runs in
test_submit_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mim_nnunet.submission import pipeline
from mim_nnunet.submission.container import entry

CONTAINER = Path(entry.__file__).parent
REPO = CONTAINER.parents[2]


@pytest.fixture
def case_and_model(tmp_path, monkeypatch):
    images = tmp_path / "input"
    images.mkdir()
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    img.SetSpacing((0.7, 0.7, 3.0))
    sitk.WriteImage(img, str(images / "FLARETs_0001_0000.nii.gz"))
    model = tmp_path / "Dataset022_FLARE22" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_all").mkdir(parents=True)
    (model / "fold_all" / "checkpoint_final.pth").write_bytes(b"w")
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset022_FLARE22"}))
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
    (model / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"})
    )

    def fake_inference(setup, cases, work_dir, *args, **kwargs):
        out = work_dir / "fake"
        out.mkdir(parents=True)
        for c in cases:
            ref = sitk.ReadImage(str(c.reference_image))
            seg = sitk.GetImageFromArray(np.full(ref.GetSize()[::-1], 13, np.uint8))
            seg.CopyInformation(ref)
            sitk.WriteImage(seg, str(out / f"{c.case_id}.nii.gz"))
        return out

    monkeypatch.setattr(pipeline, "run_inference", fake_inference)
    monkeypatch.setenv("MIM_SUBMIT_INPUT", str(images))
    monkeypatch.setenv("MIM_SUBMIT_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("MIM_SUBMIT_MODEL", str(model))
    monkeypatch.setenv("MIM_SUBMIT_PROFILE", "flare22")
    monkeypatch.setenv("MIM_SUBMIT_DEVICE", "cpu")
    monkeypatch.delenv("MIM_SUBMIT_WORK", raising=False)
    monkeypatch.delenv("MIM_SUBMIT_MANIFEST", raising=False)
    return tmp_path


def test_entry_writes_only_the_predictions(case_and_model):
    assert entry.main() == 0
    out = case_and_model / "output"
    assert [p.name for p in out.iterdir()] == ["FLARETs_0001.nii.gz"]


def test_entry_writes_nothing_when_the_submission_fails(case_and_model, monkeypatch):
    monkeypatch.setenv("MIM_SUBMIT_MODEL", str(case_and_model / "missing_model"))
    assert entry.main() == 2
    assert not (case_and_model / "output").exists()


def test_dockerfile_matches_repo_and_entry():
    text = (CONTAINER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for item in src.split():
            if not item.endswith("*"):
                assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repository"
    assert 'ENTRYPOINT ["python", "-m", "mim_nnunet.submission.container.entry"]' in text
    set_in_image = set(re.findall(r"(MIM_SUBMIT_\w+)=", text))
    read_by_entry = set(re.findall(r"\"(MIM_SUBMIT_\w+)\"", Path(entry.__file__).read_text()))
    assert {"MIM_SUBMIT_INPUT", "MIM_SUBMIT_OUTPUT", "MIM_SUBMIT_MODEL", "MIM_SUBMIT_PROFILE"} <= set_in_image
    assert set_in_image <= read_by_entry
    assert "nnUNet_extTrainer=/opt/mim-nnunet/trainers" in text
