"""End to end on the synthetic phantoms with the stock nnU-Net commands on CPU (issue 4, item 4).

plan_and_preprocess (MiM planner) -> nnUNetv2_train (fresh, --c, --val) -> nnUNetv2_find_best_configuration ->
pre-training checkpoint moved away -> export to zip, install into an empty results folder, nnUNetv2_predict
from there. About 8.5 minutes on the shared 2-core machine under load (load average 7-10).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DATASET_ID = 991
TRAINER = "nnUNetTrainerMiM_debug"
PLANS = "MiMPlans"


def run(cmd: list[str], env: dict, timeout: int = 900, cwd: Path | None = None) -> str:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, cwd=cwd)  # fmt: skip
    out = proc.stdout + proc.stderr
    print(f"[{time.perf_counter() - t:6.1f} s] {Path(cmd[0]).name} {' '.join(cmd[1:4])}", flush=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def nnunet_env(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    """nnU-Net's three folders under ``tmp_path`` and an environment for its commands (one worker everywhere:
    spawned nnU-Net workers each import torch, slow on a shared 2-core machine; the MiM trainers findable)."""
    from mim_nnunet.nnunet.paths import ensure_ext_trainer

    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    env.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    env.pop("MIM_NNUNET_CHECKPOINT", None)
    ensure_ext_trainer(env)
    return raw, pre, res, env


def bin_cmd(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
def test_plan_train_predict_export(tmp_path):
    from mim_nnunet import build_pretraining_model
    from mim_nnunet.checkpoint import CheckpointMetadata, save_checkpoint
    from mim_nnunet.data.phantoms import write_nnunet_dataset

    raw, pre, res, env = nnunet_env(tmp_path)

    # 5 training cases (nnU-Net's 5-fold split needs 5), ~53 x 37 x 37 voxels (z, y, x) at 1.5 mm -> a 48 x 32 x 32
    # patch: its token grid (3, 2, 2) differs from pre-training's (2, 2, 2), so the position table is adapted.
    folder = write_nnunet_dataset(
        raw, DATASET_ID, "MiMPhantom", n_train=5, n_test=1, seed=0, shape_mm=(56.0, 56.0, 80.0)
    )
    ckpt = tmp_path / "tiny.safetensors"
    m = build_pretraining_model("tiny")
    md = CheckpointMetadata(
        preset="tiny",
        config=m.config.to_dict(),
        spacing=[1.5] * 3,
        intensity_window=[-1000, 1000],
        input_size=32,
        crop_size=64,
    )
    sha = save_checkpoint(ckpt, m.state_dict(), md)

    run(
        [
            bin_cmd("mim_nnunet_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-pt",
            str(ckpt),
            "-np",
            "1",
            "-npfp",
            "1",
        ],
        env,
    )
    import json

    plans = json.loads((pre / folder.name / f"{PLANS}.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [48, 32, 32] and cfg["batch_size"] >= 2
    assert cfg["architecture"]["network_class_name"] == "mim_nnunet.model.segmentation.MiMSegmentationNetwork"
    assert plans["mim"]["checkpoint"]["sha256"] == sha
    assert plans["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"] == -1000

    train = [
        bin_cmd("nnUNetv2_train"),
        str(DATASET_ID),
        "3d_fullres",
        "0",
        "-tr",
        TRAINER,
        "-p",
        PLANS,
        "-device",
        "cpu",
    ]
    out = run(train, env)
    assert "MiM encoder loaded" in out and "position embedding (2, 2, 2) -> (3, 2, 2) (recomputed)" in out
    fold = res / folder.name / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    # The trained model predicts with the sin-cos table of its patch grid at integer positions (issue 9).
    import torch

    from mim_nnunet.model.pos_embed import sincos_pos_embed_3d

    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert torch.equal(weights["encoder.pos_embed"], sincos_pos_embed_3d(m.config.dims[3], (3, 2, 2))[None])

    out = run(train + ["--c"], env)  # resumes from nnU-Net's checkpoint: must not reload the MiM encoder
    assert "MiM encoder loaded" not in out
    run(train + ["--val"], env)

    out = run(
        [bin_cmd("nnUNetv2_find_best_configuration"), str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER,
         "-p", PLANS, "-f", "0", "--disable_ensembling", "-np", "1"],
        env,
    )  # fmt: skip
    assert (res / folder.name / "inference_instructions.txt").is_file()

    # Inference needs nothing from pre-training: move the checkpoint away, ship the model as a zip, install it
    # into an empty results folder and predict from there (one prediction run: each costs about a minute).
    ckpt.rename(tmp_path / "moved_away.safetensors")
    zip_path = tmp_path / "model.zip"
    run(
        [bin_cmd("nnUNetv2_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(zip_path), "-c", "3d_fullres",
         "-tr", TRAINER, "-p", PLANS, "-f", "0"],
        env,
    )  # fmt: skip
    env2 = dict(env, nnUNet_results=str(tmp_path / "res_installed"))
    run([bin_cmd("nnUNetv2_install_pretrained_model_from_zip"), str(zip_path)], env2)
    pred = tmp_path / "pred"
    predict = [
        bin_cmd("nnUNetv2_predict"), "-i", str(folder / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
        "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
        "-npp", "1", "-nps", "1",
    ]  # fmt: skip
    run(predict, env2)
    seg = read(pred / "MiMPhantom_ts000.nii.gz")
    assert seg.shape == read(folder / "imagesTs" / "MiMPhantom_ts000_0000.nii.gz").shape
    n_labels = len(json.loads((folder / "dataset.json").read_text())["labels"])
    assert set(np.unique(seg).tolist()) <= set(range(n_labels))
