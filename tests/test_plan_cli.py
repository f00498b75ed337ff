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
    return subprocess.run([sys.executable, "-m", "mim_nnunet.cli.plan", *args], env=environ, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


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
