"""Region-based training with the MiM network, end to end on the KiTS-like phantoms: the commands of
docs/tumours.md, "From the phantom dataset to a kits23 submission", read from that page and run as written.

phantom KiTS dataset (5 training, 2 test cases, 56 x 56 x 80 mm) -> untrained tiny MiM checkpoint -> plan ->
nnUNetv2_train (nnUNetTrainerMiM_smoke: 1 epoch of 2 iterations) -> nnUNetv2_predict -> mim_nnunet_submit
--profile kits23 -> evaluate --profile kits23 --lesions. Then the trained region model with a
plain-label profile, refused before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_nnunet_e2e import bin_cmd, nnunet_env, read, run

DOC = Path(__file__).resolve().parents[1] / "docs" / "tumours.md"
HEADING = "## From the phantom dataset to a kits23 submission"
DATASET = "Dataset993_KiTSPhantom"
MODEL = f"{DATASET}/nnUNetTrainerMiM_smoke__MiMPlans__3d_fullres"
KITS_TARGETS = {"1+2+3": "kidney_and_mass", "2+3": "mass", "2": "tumor"}


def doc_commands(path: Path = DOC) -> list[str]:
    """The command lines of the first bash block under HEADING (continuations joined)."""
    text = path.read_text()
    section = text[text.index(HEADING) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"{path}: no bash block under {HEADING!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_documented_commands_are_the_whole_path():
    tools = [shlex.split(c)[0] for c in doc_commands()]
    assert tools == ["mim_nnunet_phantoms", "mim_nnunet_plan_and_preprocess", "nnUNetv2_train",
                     "nnUNetv2_predict", "mim_nnunet_submit", "mim_nnunet_submit"]  # fmt: skip


def _checkpoint(path: Path) -> None:
    from mim_nnunet import build_pretraining_model
    from mim_nnunet.checkpoint import CheckpointMetadata, save_checkpoint

    m = build_pretraining_model("tiny")
    md = CheckpointMetadata(preset="tiny", config=m.config.to_dict(), spacing=[1.5] * 3,
                            intensity_window=[-1000, 1000], input_size=32, crop_size=64)  # fmt: skip
    save_checkpoint(path, m.state_dict(), md)


def _run_doc(tmp_path: Path, env: dict, variables: dict[str, str]) -> list[tuple[list[str], str]]:
    """Run every documented command in ``tmp_path`` ($NAME from ``variables``); [(argv, output)]."""
    done = []
    for line in doc_commands():
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
        # training augments in its own process (no worker processes: each imports torch again)
        step_env = {**env, "nnUNet_n_proc_DA": "0"} if argv[0] == "nnUNetv2_train" else env
        done.append((argv, run([bin_cmd(argv[0]), *argv[1:]], step_env, cwd=tmp_path)))
    return done


@pytest.mark.slow
def test_kits_regions_plan_train_predict_submit_evaluate(tmp_path):
    import torch
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    raw, pre, res, env = nnunet_env(tmp_path)
    ckpt = tmp_path / "tiny.safetensors"
    _checkpoint(ckpt)
    done = _run_doc(tmp_path, env, {"nnUNet_raw": str(raw), "nnUNet_results": str(res), "CKPT": str(ckpt)})
    logs = {argv[0] + ("_evaluate" if "evaluate" in argv else ""): out for argv, out in done}
    folder = raw / DATASET
    dataset_json = json.loads((folder / "dataset.json").read_text())
    lm = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
    assert lm.has_regions and lm.num_segmentation_heads == 3

    # plan: the memory model counted the 3 region heads, not the 4 entries of "labels"
    plans = json.loads((pre / DATASET / "MiMPlans.json").read_text())
    assert plans["mim"]["decisions"]["output_heads"].startswith("3 output heads, one sigmoid per region")

    # train: 3 output channels, nnU-Net's region loss (sigmoid + BCE), in the log and in the weights
    train_log = logs["nnUNetv2_train"]
    assert "MiM encoder loaded" in train_log
    assert "MiM: 3 output heads for 3 regions [(1, 2, 3), (2, 3), 2] (sigmoid), loss DC_and_BCE_loss" in train_log
    fold = res / MODEL / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    heads = [k for k in weights if re.fullmatch(r"decoder\.seg_layers\.\d+\.weight", k)]
    assert heads and all(weights[k].shape[0] == 3 for k in heads)

    # predict: label values 0..3, and exactly regions_class_order applied to the 3 sigmoids at 0.5
    pred = tmp_path / "kits_pred"
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTs").iterdir())
    assert cases == ["case_00005", "case_00006"]
    for case in cases:
        seg = read(pred / f"{case}.nii.gz")
        assert seg.shape == read(folder / "imagesTs" / f"{case}_0000.nii.gz").shape
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        probs = np.load(pred / f"{case}.npz")["probabilities"]
        assert probs.shape == (3, *seg.shape)
        expected = np.zeros(seg.shape, np.uint8)
        for i, value in enumerate(dataset_json["regions_class_order"]):
            expected[probs[i] > 0.5] = value
        assert np.array_equal(seg, expected)

    # submit: a valid kits23 submission of the same label maps, zipped
    sub = tmp_path / "kits_submission"
    validation = json.loads((sub / "validation.json").read_text())
    assert validation["ok"] is True and len(validation["cases"]) == 2
    with zipfile.ZipFile(sub / "submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"{c}.nii.gz" for c in cases]
    for case in cases:
        assert np.array_equal(read(sub / "predictions" / f"{case}.nii.gz"), read(pred / f"{case}.nii.gz"))
    assert "validation PASSED (profile kits23): 2/2 cases valid" in logs["mim_nnunet_submit"]

    # evaluate: KiTS23's three regions, every case, scores in [0, 1]; lesions counted as the references hold them
    import cc3d

    scores = json.loads((tmp_path / "kits_scores.json").read_text())
    assert {t["key"]: t["name"] for t in scores["targets"]} == KITS_TARGETS
    assert scores["n_cases"] == 2 and scores["empty"] == "one"
    for key in KITS_TARGETS:
        for metric in ("Dice", "NSD"):
            assert 0.0 <= scores["mean"][key][metric] <= 1.0
    assert scores["lesions"]["targets"] == ["2", "2+3"]
    for case in scores["per_case"]:
        ref = read(folder / "labelsTs" / case["case"])
        for key, values in (("2", [2]), ("2+3", [2, 3])):
            n = cc3d.connected_components(np.isin(ref, values).astype(np.uint8), connectivity=26).max()
            assert case["lesions"][key]["n_ref"] == n
    # a quarter of a split's cases, rounded half up, has no lesion (docs/tumours.md): one of the two test cases
    assert sorted(c["lesions"]["2+3"]["n_ref"] > 0 for c in scores["per_case"]) == [False, True]

    # the region model with a profile that expects plain labels: refused before any prediction, nothing written
    from mim_nnunet.cli.submit import main

    refused, stderr = tmp_path / "flare_submission", io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["-i", str(folder / "imagesTs"), "-m", str(res / MODEL), "--profile", "flare22",
                     "-o", str(refused)]) == 2  # fmt: skip
    err = stderr.getvalue().strip().splitlines()
    assert len(err) == 1 and str(res / MODEL / "dataset.json") in err[0]
    assert "region-trained model" in err[0] and "expects plain labels" in err[0]
    assert not refused.exists()
