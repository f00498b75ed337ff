"""Issue 9 point 6: a converted authors-format file plans, fine-tunes and predicts with the stock commands on CPU.

mim_nnunet_convert (synthetic authors file, tiny preset, built as in tests/test_convert.py) ->
mim_nnunet_plan_and_preprocess -pt -> nnUNetv2_train nnUNetTrainerMiM_study -> nnUNetv2_predict. The study's
trainer is nnUNetTrainerMiM's fine-tuning at a length from the environment (here 1 epoch of 2 iterations) without
nnU-Net's final validation pass (two worker-process start-ups), which this test does not read: it checks the loaded
encoder, its position table in the trained weights, and the prediction.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_convert import authors_state, save_authors
from test_nnunet_e2e import bin_cmd, nnunet_env, read, run

DATASET_ID = 992
TRAINER = "nnUNetTrainerMiM_study"
PLANS = "MiMPlans"


@pytest.mark.slow
def test_converted_checkpoint_plans_finetunes_and_predicts(tmp_path):
    import torch

    from mim_nnunet.data.phantoms import write_nnunet_dataset
    from mim_nnunet.model.pos_embed import AXES_CONVERTED, sincos_pos_embed_3d

    raw, pre, res, env = nnunet_env(tmp_path)
    env.update(MIM_NNUNET_STUDY_EPOCHS="1", MIM_NNUNET_STUDY_ITERS="2")  # nnUNetTrainerMiM_study's length
    # the small dataset of tests/test_nnunet_e2e.py: a patch of 2 x 2 x 3 tokens (in some axis order)
    folder = write_nnunet_dataset(raw, DATASET_ID, "MiMPhantom", n_train=5, n_test=1, seed=0,
                                  shape_mm=(56.0, 56.0, 80.0))
    state, _ = authors_state("tiny", input_size=32)
    src = save_authors(tmp_path / "MiM_tiny.pth", state, ddp=True)
    ckpt = tmp_path / "converted.safetensors"
    # `mim_nnunet_convert` is this module's console script
    out = run([sys.executable, "-m", "mim_nnunet.cli.convert", str(src), "-o", str(ckpt)], env)
    assert "conv LayerNorm eps 1e-05" in out

    run([bin_cmd("mim_nnunet_plan_and_preprocess"), "-d", str(DATASET_ID), "-pt", str(ckpt), "-np", "1",
         "-npfp", "1"], env)  # fmt: skip
    plans = json.loads((pre / folder.name / f"{PLANS}.json").read_text())
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    grid = tuple(p // 16 for p in kw["patch_size"])
    assert sorted(grid) == [2, 2, 3] and kw["conv_ln_eps"] == 1e-5 and kw["feature_norm"] == "per_map"
    assert plans["mim"]["checkpoint"]["corpus"]["provenance"] == "converted"

    out = run([bin_cmd("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
               "-device", "cpu"], env)  # fmt: skip
    assert "MiM encoder loaded" in out and f"position embedding (2, 2, 2) -> {grid} (recomputed)" in out
    fold = res / folder.name / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    # the converted table's axis order survives into the trained model
    assert torch.equal(weights["encoder.pos_embed"], sincos_pos_embed_3d(48, grid, AXES_CONVERTED)[None])

    pred = tmp_path / "pred"  # predicted in-process (-npp 0 -nps 0): no worker process start-ups
    run([bin_cmd("nnUNetv2_predict"), "-i", str(folder / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "0", "-nps", "0"], env)  # fmt: skip
    seg = read(pred / "MiMPhantom_ts000.nii.gz")
    assert seg.shape == read(folder / "imagesTs" / "MiMPhantom_ts000_0000.nii.gz").shape
    n_labels = len(json.loads((folder / "dataset.json").read_text())["labels"])
    assert set(np.unique(seg).tolist()) <= set(range(n_labels))
