"""The container pieces without Docker: the entry script under each challenge's folder convention (inference
stubbed; FLARE's `/bin/bash -c "sh predict.sh"` and AMOS's ./input -> ./output run as real subprocesses), and the
Dockerfile's pins, user and consistency with the repository. The entry script with a real model runs in
test_submit_e2e.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mim_nnunet.submission import pipeline
from mim_nnunet.submission.container import entry
from mim_nnunet.submission.container.pin_requirements import runtime_requirements

CONTAINER = Path(entry.__file__).parent
REPO = CONTAINER.parents[2]


def write_image(path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    img.SetSpacing((0.7, 0.7, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def make_model(tmp_path: Path) -> Path:
    model = tmp_path / "Dataset022_FLARE22" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_all").mkdir(parents=True)
    (model / "fold_all" / "checkpoint_final.pth").write_bytes(b"w")
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset022_FLARE22"}))
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
    (model / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"})
    )
    return model


def fake_inference(setup, cases, work_dir, *args, **kwargs):
    """What nnU-Net would write: one segmentation per case on the case's grid (all label 13)."""
    out = work_dir / "fake"
    out.mkdir(parents=True)
    for c in cases:
        ref = sitk.ReadImage(str(c.reference_image))
        seg = sitk.GetImageFromArray(np.full(ref.GetSize()[::-1], 13, np.uint8))
        seg.CopyInformation(ref)
        sitk.WriteImage(seg, str(out / f"{c.case_id}.nii.gz"))
    return out


@pytest.fixture
def case_and_model(tmp_path, monkeypatch):
    write_image(tmp_path / "input" / "FLARETs_0001_0000.nii.gz")
    model = make_model(tmp_path)
    monkeypatch.setattr(pipeline, "run_inference", fake_inference)
    monkeypatch.setenv("MIM_SUBMIT_INPUT", str(tmp_path / "input"))
    monkeypatch.setenv("MIM_SUBMIT_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("MIM_SUBMIT_MODEL", str(model))
    monkeypatch.setenv("MIM_SUBMIT_PROFILE", "flare22")
    monkeypatch.setenv("MIM_SUBMIT_DEVICE", "cpu")
    for var in ("MIM_SUBMIT_WORK", "MIM_SUBMIT_MANIFEST", "MIM_SUBMIT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_entry_writes_only_the_predictions(case_and_model):
    assert entry.main([]) == 0
    out = case_and_model / "output"
    assert [p.name for p in out.iterdir()] == ["FLARETs_0001.nii.gz"]


def test_entry_writes_nothing_when_the_submission_fails(case_and_model, monkeypatch):
    monkeypatch.setenv("MIM_SUBMIT_MODEL", str(case_and_model / "missing_model"))
    assert entry.main([]) == 2
    assert not (case_and_model / "output").exists()


def test_unwritable_output_is_reported_before_inference(case_and_model, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_inference", lambda *a, **k: calls.append(1))
    # The tests run as root, for whom every folder is writable: simulate a root-owned mount for a non-root user.
    monkeypatch.setattr(entry.os, "access", lambda path, mode: False)
    assert entry.main([]) == 2
    assert "not writable by uid" in capsys.readouterr().err and not calls


@pytest.mark.parametrize(
    "profile,root,spec_root",
    [
        ("flare22", "/workspace", "/workspace"),
        ("flare23", "/workspace", "/workspace"),
        ("amos22", ".", None),
        ("generic", "/", "/"),
    ],
)
def test_each_profile_has_its_challenges_folders(profile, root, spec_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_dir, out_dir = entry.resolve_folders(profile, None, None, None)
    expected = {
        "flare22": ("/workspace/inputs", "/workspace/outputs"),
        "flare23": ("/workspace/inputs", "/workspace/outputs"),
        "amos22": (str(tmp_path / "input"), str(tmp_path / "output")),
        "generic": ("/input", "/output"),
    }[profile]
    assert (str(in_dir), str(out_dir)) == expected
    rerooted = entry.resolve_folders(profile, str(tmp_path / "r"), None, None)
    assert rerooted[0].parent == tmp_path / "r"


STUB = '''
"""Loaded at interpreter start (sitecustomize): nnU-Net inference replaced by what it would write."""
import numpy as np
import SimpleITK as sitk

from mim_nnunet.submission import pipeline


def fake_inference(setup, cases, work_dir, *args, **kwargs):
    out = work_dir / "fake"
    out.mkdir(parents=True)
    for c in cases:
        ref = sitk.ReadImage(str(c.reference_image))
        seg = sitk.GetImageFromArray(np.full(ref.GetSize()[::-1], 13, np.uint8))
        seg.CopyInformation(ref)
        sitk.WriteImage(seg, str(out / f"{c.case_id}.nii.gz"))
    return out


pipeline.run_inference = fake_inference
'''


def run_predict_sh(
    workdir: Path, tmp_path: Path, profile: str, extra_env: dict
) -> subprocess.CompletedProcess:
    """`/bin/bash -c "sh predict.sh"` in ``workdir``, as the challenge's docker run does, inference stubbed."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(STUB)
    shutil.copy(CONTAINER / "predict.sh", workdir / "predict.sh")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(stub), str(REPO)]),
        "MIM_SUBMIT_PYTHON": sys.executable,
        "MIM_SUBMIT_PROFILE": profile,
        "MIM_SUBMIT_MODEL": str(make_model(tmp_path)),
        "MIM_SUBMIT_DEVICE": "cpu",
        **extra_env,
    }
    for var in ("MIM_SUBMIT_INPUT", "MIM_SUBMIT_OUTPUT", "MIM_SUBMIT_ROOT", "MIM_SUBMIT_WORK"):
        if var not in extra_env:
            env.pop(var, None)
    return subprocess.run(
        ["/bin/bash", "-c", "sh predict.sh"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("profile", ["flare22", "flare23"])
def test_predict_sh_under_flare_convention(tmp_path, profile):
    """FLARE mounts inputs/ and outputs/ under /workspace and runs `sh predict.sh` there, once per case."""
    workspace = tmp_path / "workspace"  # stands for /workspace: MIM_SUBMIT_ROOT moves the profile's root
    write_image(workspace / "inputs" / "FLARE23Ts_0001_0000.nii.gz")
    (workspace / "outputs").mkdir()
    proc = run_predict_sh(workspace, tmp_path, profile, {"MIM_SUBMIT_ROOT": str(workspace)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (workspace / "outputs").iterdir()] == ["FLARE23Ts_0001.nii.gz"]
    seg = sitk.ReadImage(str(workspace / "outputs" / "FLARE23Ts_0001.nii.gz"))
    assert seg.GetSize() == (6, 5, 4) and seg.GetSpacing() == pytest.approx((0.7, 0.7, 3.0))


def test_predict_sh_under_amos_convention(tmp_path):
    """AMOS's template: ./input -> ./output in the working directory (the profile's root '.')."""
    workdir = tmp_path / "amos"
    write_image(workdir / "input" / "amos_0507.nii.gz")
    proc = run_predict_sh(workdir, tmp_path, "amos22", {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (workdir / "output").iterdir()] == ["amos_0507.nii.gz"]


# ---- Dockerfile -------------------------------------------------------------------------------------------------
def dockerfile() -> str:
    return (CONTAINER / "Dockerfile").read_text()


def test_dockerfile_matches_repo_and_entry():
    text = dockerfile()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for item in src.split():
            if not item.endswith("*") and not item.startswith("--"):
                assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repository"
    set_in_image = set(re.findall(r"(MIM_SUBMIT_\w+)=", text))
    read_by_entry = set(re.findall(r"\"(MIM_SUBMIT_\w+)\"", Path(entry.__file__).read_text()))
    assert {"MIM_SUBMIT_MODEL", "MIM_SUBMIT_PROFILE"} <= set_in_image <= read_by_entry
    assert "nnUNet_extTrainer=/opt/mim-nnunet/trainers" in text


def test_dockerfile_runs_predict_sh_in_workspace_without_entrypoint():
    """FLARE's `IMAGE /bin/bash -c "sh predict.sh"` needs /workspace/predict.sh and no ENTRYPOINT to swallow it."""
    text = dockerfile()
    assert not re.search(r"^ENTRYPOINT", text, flags=re.M)
    workdirs = re.findall(r"^WORKDIR (\S+)", text, flags=re.M)
    assert workdirs[-1] == "/workspace"
    assert re.search(r"^COPY \S*predict\.sh /workspace/predict\.sh$", text, flags=re.M)
    assert re.search(r'^CMD \["sh", "predict.sh"\]$', text, flags=re.M)


def test_dockerfile_pins_base_image_and_runs_as_non_root():
    text = dockerfile()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    # An exact patch-level tag or a digest; never 'latest' or a floating 'python:3.11-slim'.
    assert "@sha256:" in base or re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), base
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users
    user = users[-1]
    if user.startswith("${"):  # a build argument: its default is what a plain build runs as
        (user,) = re.findall(rf"^ARG {user[2:-1]}=(\S+)", text, flags=re.M)
    assert user not in ("root", "0", "0:0")
    assert re.search(rf"useradd .*{user}", text)


def test_dockerfile_installs_only_pinned_packages():
    text = dockerfile()
    installs = re.findall(r"pip install ([^&\n]+)", text)
    assert installs
    for cmd in installs:
        assert "-r requirements.txt" in cmd or "--no-deps ." in cmd, cmd
    lines = [
        ln.strip()
        for ln in (CONTAINER / "requirements.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    pins = {}
    for ln in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", ln)
        assert m, f"requirements.txt line {ln!r} is not name==version"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (a dependency in pyproject.toml) is not pinned for the image"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert Requirement("surface-distance==0.1").specifier.contains(pins["surface-distance"])
