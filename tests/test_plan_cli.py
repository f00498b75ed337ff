"""``mim_nnunet_plan_and_preprocess``: one-line errors for unset nnU-Net folders, unknown dataset ids, bad -pt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mim_nnunet
from mim_nnunet.checkpoint import CheckpointMetadata, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    m = mim_nnunet.build_pretraining_model("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_final.safetensors"
    save_checkpoint(path, m.state_dict(), CheckpointMetadata(
        preset="tiny", config=m.config.to_dict(), spacing=[1.5] * 3, intensity_window=[-1000.0, 1000.0],
        input_size=m.input_size, crop_size=m.crop_size))  # fmt: skip
    return path


def _plan(args: list[str], **env: str | None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    environ |= {"PYTHONPATH": str(ROOT)} | {k: v for k, v in env.items() if v is not None}
    # nnU-Net prints non-ASCII characters; a C locale must not make the capture fail
    return subprocess.run([sys.executable, "-m", "mim_nnunet.cli.plan", *args], env=environ, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_unset_nnunet_folders(checkpoint):
    line = _one_line_error(_plan(["-d", "990", "-pt", str(checkpoint)]))
    assert "nnUNet_raw and nnUNet_preprocessed not set" in line


def test_unknown_dataset_id(checkpoint, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "pre").mkdir()
    line = _one_line_error(_plan(["-d", "4242", "-pt", str(checkpoint)], nnUNet_raw=str(tmp_path / "raw"),
                                 nnUNet_preprocessed=str(tmp_path / "pre")))  # fmt: skip
    assert "-d 4242: Could not find a dataset with the ID 4242" in line and "Dataset4242_*" in line
    assert str(tmp_path / "raw") in line


def test_missing_checkpoint(tmp_path):
    line = _one_line_error(_plan(["-d", "990", "-pt", str(tmp_path / "nope.safetensors")],
                                 nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path)))  # fmt: skip
    assert "nope.safetensors: no such checkpoint file" in line


def test_empty_window_refused(checkpoint, tmp_path):
    line = _one_line_error(_plan(["-d", "990", "-pt", str(checkpoint), "--window", "250", "-175"],
                                 nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path)))  # fmt: skip
    assert "--window 250 -175: LO must be below HI" in line


@pytest.fixture(scope="module")
def default_plans(checkpoint, tmp_path_factory):
    """A 2-case phantom dataset (977) planned with -plans_name Default (--no_pp): its nnU-Net folders and the
    command's result, for the two tests below (each plan command is a process start-up and a fingerprint)."""
    from mim_nnunet.data.phantoms import write_nnunet_dataset

    root = tmp_path_factory.mktemp("default_plans")
    raw, pre = root / "raw", root / "pre"
    folder = write_nnunet_dataset(raw, 977, "Win", n_train=2, n_test=0, seed=0, shape_mm=(56.0, 56.0, 56.0))
    env = dict(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(root / "res"))
    proc = _plan(["-d", "977", "-pt", str(checkpoint), "-npfp", "1", "--no_pp", "-plans_name", "Default"], **env)
    return pre / folder.name, env, proc


def test_fine_tuning_window_replaces_the_checkpoints_in_the_plans(checkpoint, default_plans):
    import json

    plans, env, proc = default_plans
    assert proc.returncode == 0, proc.stderr
    proc = _plan(["-d", "977", "-pt", str(checkpoint), "-npfp", "1", "--no_pp", "-plans_name", "Task",
                  "--window", "-175", "250"], **env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    default, task = (json.loads((plans / f"{n}.json").read_text()) for n in ("Default", "Task"))
    props = task["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["std"]) == (-175.0, 250.0, 425.0)
    assert task["mim"]["intensity_window"] == [-175.0, 250.0]
    assert "fine-tuning window (--window; pre-training window [-1000.0, 1000.0])" in task["mim"]["decisions"][
        "normalization"]  # fmt: skip
    assert default["mim"]["intensity_window"] == [-1000.0, 1000.0]
    assert default["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"] == -1000.0
    assert "the checkpoint's pre-training window" in default["mim"]["decisions"]["normalization"]
    # The phantoms' foreground fills about a fifth of -1000..1000: the default plans say so, the task plans don't.
    assert "--window LO HI" in default["mim"]["decisions"]["window_hint"]
    assert "window_hint" not in task["mim"]["decisions"]


def test_closing_line_names_the_planned_dataset_and_plans(default_plans):
    _, _, proc = default_plans
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.split() == ["nnUNetv2_train", "977", "3d_fullres", "FOLD", "-tr", "nnUNetTrainerMiM", "-p", "Default"]


@pytest.mark.parametrize(
    "labels, order, expected",
    [
        ({"background": 0, "kidney": [1, 7], "masses": [2, 3], "tumor": 2}, [1, 3, 2],
         "region 'kidney' [1, 7] names label 7, which is not a label value of this dataset; expected values in "
         "[0, 1, 2, 3]"),
        ({"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}, [1, 3, 7],
         "regions_class_order[2] = 7 is not a label of region 'tumor' [2]; expected one of [2]"),
    ],
)  # fmt: skip
def test_regions_naming_unknown_labels_are_refused_before_any_work(checkpoint, tmp_path, labels, order, expected):
    import json

    from mim_nnunet.data.phantoms import write_nnunet_dataset

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = write_nnunet_dataset(raw, 975, "Regions", n_train=1, n_test=0, seed=0, shape_mm=(40.0, 40.0, 40.0),
                                  task="kits")  # fmt: skip
    ds = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**ds, "labels": labels, "regions_class_order": order}))
    line = _one_line_error(_plan(["-d", "975", "-pt", str(checkpoint), "-npfp", "1", "--no_pp"],
                                 nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre)))  # fmt: skip
    assert line.startswith(f"error: -d 975: {folder / 'dataset.json'}: {expected}")
    assert not pre.exists() or not any(pre.rglob("*"))  # no fingerprint, no plans


def test_the_planner_class_refuses_them_too(checkpoint, tmp_path, monkeypatch):
    """Through nnU-Net's API (plan_experiment_dataset with the class), where the command's check is bypassed."""
    import json

    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner

    from mim_nnunet.data.phantoms import write_nnunet_dataset
    from mim_nnunet.nnunet.planner import MiMPlanner, PlanningError

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = write_nnunet_dataset(raw, 975, "Regions", n_train=1, n_test=0, seed=0, shape_mm=(40.0, 40.0, 40.0),
                                  task="kits")  # fmt: skip
    ds = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**ds, "regions_class_order": [1, 2]}))
    (pre / folder.name).mkdir(parents=True)
    (pre / folder.name / "dataset_fingerprint.json").write_text("{}")
    monkeypatch.setattr(default_experiment_planner, "nnUNet_raw", str(raw))
    monkeypatch.setattr(default_experiment_planner, "nnUNet_preprocessed", str(pre))
    with pytest.raises(PlanningError, match=r"regions_class_order is \[1, 2\]; expected one label value per"):
        MiMPlanner(folder.name, checkpoint=checkpoint)
