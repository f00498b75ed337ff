"""The label-efficiency study (issue 10): its trainers, its report from run results, and ``--quick`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _study_module():
    return load_benchmark("study_label_efficiency")


@pytest.mark.parametrize(
    "name",
    [
        "nnUNetTrainerMiM_study", "nnUNetTrainerMiM_scratch_study", "nnUNetTrainerStock_study",
        "nnUNetTrainerMiM_lowenc_study", "nnUNetTrainerMiM_scratch_lowenc_study",
    ],  # fmt: skip
)
def test_stock_lookup_finds_study_trainers(monkeypatch, name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import mim_nnunet.nnunet.study_trainers as module
    from mim_nnunet.nnunet.paths import ensure_ext_trainer

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    env: dict = {}
    ensure_ext_trainer(env)
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
    assert recursive_find_trainer_class_by_name(name) is getattr(module, name)


def test_study_trainer_copy_and_variants():
    import mim_nnunet.nnunet
    from mim_nnunet.nnunet import study_trainers as st
    from mim_nnunet.nnunet.trainer import nnUNetTrainerMiM

    installed = Path(mim_nnunet.nnunet.__file__).parent / "ext_trainers" / "nnUNetTrainerStudy.py"
    assert installed.read_text() == (REPO / "trainers" / "nnUNetTrainerStudy.py").read_text()
    assert st.nnUNetTrainerMiM_study.load_pretrained and not st.nnUNetTrainerMiM_scratch_study.load_pretrained
    assert issubclass(st.nnUNetTrainerMiM_study, nnUNetTrainerMiM)
    assert not issubclass(st.nnUNetTrainerStock_study, nnUNetTrainerMiM)


def test_study_env_is_validated(monkeypatch):
    from mim_nnunet.nnunet.study_trainers import EPOCHS_ENV, _env_int

    monkeypatch.setenv(EPOCHS_ENV, "12")
    assert _env_int(EPOCHS_ENV, 3) == 12
    monkeypatch.setenv(EPOCHS_ENV, "ten")
    with pytest.raises(ValueError, match="MIM_NNUNET_STUDY_EPOCHS='ten'"):
        _env_int(EPOCHS_ENV, 3)


def _fake_run(arm: str, k: int, seed: int, dice: float) -> dict:
    organs = {o: {"Dice": dice, "NSD": dice} for o in ("liver", "spleen", "kidneys")}
    return {
        "arm": arm, "k": k, "seed": seed, "trainer": "T", "plans": "P", "iterations": 10, "train_seconds": 5.0,
        "predict_seconds": 2.0, "n_test": 2, "tolerance_mm": 2.0, "foreground_mean": {"Dice": dice, "NSD": dice},
        "per_organ": organs, "patch_size": [32, 32, 32], "seeding": "every-batch-v1",
    }  # fmt: skip


def test_report_from_partial_results(tmp_path):
    """The report is re-built from whatever run results exist, says which are missing, keeps the page's text."""
    study = _study_module()
    s = study.Settings(ks=(2, 8), seeds=(0, 1), arms=("MiM", "scratch"), test=2)
    (tmp_path / "runs").mkdir()
    done = [("MiM", 2, 0, 0.5), ("MiM", 2, 1, 0.7), ("MiM", 8, 0, 0.8), ("scratch", 2, 0, 0.3)]
    for arm, k, seed, dice in done:
        (tmp_path / "runs" / f"{arm}_k{k}_s{seed}_it200.json").write_text(json.dumps(_fake_run(arm, k, seed, dice)))
    # a run from before every batch was seeded: never pooled with the seeded ones
    old = {key: v for key, v in _fake_run("scratch", 8, 0, 0.9).items() if key != "seeding"}
    (tmp_path / "runs" / "scratch_k8_s0_it200.json").write_text(json.dumps(old))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "study.md").write_text(
        f"# Study\n\nhand-written text\n\n{study.REPORT_BEGIN}\nold\n{study.REPORT_END}\n"
    )
    report = study.build_report(tmp_path, s, docs)
    cell = next(c for c in report["cells"] if c["arm"] == "MiM" and c["k"] == 2)
    assert (
        cell["n_seeds"] == 2
        and cell["dice_mean"] == pytest.approx(0.6)
        and cell["dice_sd"] == pytest.approx(0.1414, abs=1e-3)
    )
    assert sorted(report["missing_runs"]) == [
        "MiM_k8_s1_it200", "scratch_k2_s1_it200", "scratch_k8_s0_it200", "scratch_k8_s1_it200"
    ]
    assert report["excluded_runs"] == ["scratch_k8_s0_it200"]
    assert not report["complete"]
    md = (docs / "study.md").read_text()
    assert "hand-written text" in md and "old" not in md and md.count(study.REPORT_BEGIN) == 1
    assert "| MiM | 2 | 2 | 0.600 +- 0.141 |" in md and "| scratch | 8 | 0 | (missing) |" in md
    assert "**Incomplete**: 4 of 8 runs missing" in md and "Not pooled" in md and "scratch_k8_s0_it200" in md
    # seed-paired against scratch: only seed 0 is in both at k = 2 (0.5 - 0.3), one seed: no interval
    assert cell["paired"]["n"] == 1 and cell["paired"]["mean"] == pytest.approx(0.2)
    assert cell["paired"]["ci95"] is None and cell["paired"]["n_above"] == 1
    assert "+0.200, 1/1 above" in md
    assert json.loads((docs / "study.json").read_text())["missing_runs"] == report["missing_runs"]
    assert (docs / "study_dice_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| MiM | 2 | 2 | 0.600 +- 0.141 |" in md and "(baseline)" in md and "Welch's 95 % interval" in md
    # Against the baseline: difference of means and Welch's interval (df = 2 here: t = 4.303, se = 0.1414).
    diff = study._against_baseline(
        {"arm": "MiM", "n_seeds": 2, "dice_per_seed": [0.5, 0.7]},
        {"arm": "scratch", "n_seeds": 2, "dice_per_seed": [0.3, 0.5]},
    )
    assert diff["dice_vs_baseline"] == pytest.approx(0.2)
    assert diff["dice_vs_baseline_ci95"] == pytest.approx([0.2 - 0.6085, 0.2 + 0.6085], abs=1e-3)
    # Paired: differences 0.2, 0.1, 0.3 -> mean 0.2, sd 0.1, t(2) = 4.303: CI 0.2 +- 4.303 * 0.1 / sqrt(3)
    paired = study._paired_against_baseline(
        {"arm": "MiM", "n_seeds": 4, "seeds": [0, 1, 2, 5], "dice_per_seed": [0.5, 0.5, 0.6, 0.9]},
        {"arm": "scratch", "n_seeds": 3, "seeds": [0, 1, 2], "dice_per_seed": [0.3, 0.4, 0.3]},
    )["paired"]
    assert paired["seeds"] == [0, 1, 2] and paired["n_above"] == 3
    assert paired["mean"] == pytest.approx(0.2) and paired["sd"] == pytest.approx(0.1)
    assert paired["ci95"] == pytest.approx([0.2 - 0.2484, 0.2 + 0.2484], abs=1e-3)
    assert paired["half_width"] == pytest.approx(0.2484, abs=1e-3)
    one_seed = next(c for c in report["cells"] if c["arm"] == "scratch" and c["k"] == 2)
    assert one_seed["n_seeds"] == 1 and study._against_baseline(cell, one_seed) == {}
    assert "dice_vs_baseline" not in cell  # the report's own cell: the baseline has one seed at k = 2
    # The plot's legend names an arm's iterations when they are not the study's (the stock arm's equal wall-clock).
    assert study._iterations_note([{"iterations": 50}] * 2, s) == ", 50 iterations"
    assert study._iterations_note([{"iterations": s.epochs * s.iters}], s) == ""


def test_arms_are_one_entry_each():
    study = _study_module()
    assert {"MiM", "MAE", "scratch", "nnUNet"} <= set(study.ARMS)
    assert study.ARMS["MAE"].pretrain_args == ("--levels", "1") and study.ARMS["MiM"].pretrain_args == ()
    assert study.ARMS["MiM"].trainer == study.ARMS["MAE"].trainer  # the same fine-tuning for both checkpoints
    assert study.ARMS["nnUNet"].plans == "stock" and study.ARMS["scratch"].pretrain_args is None
    # diagnostic arms are opt-in and fine-tune another arm's checkpoint instead of pre-training their own
    assert set(study.DEFAULT_ARMS) == {"MiM", "MiM-EMA", "MAE", "scratch", "nnUNet"}
    s = study.Study.__new__(study.Study)
    s.s = study.Settings(arms=("MiM-lowenc", "scratch-lowenc"))
    assert s.pretrained_arms() == ["MiM"]
    assert s.plans_name("MiM-lowenc") == s.plans_name("scratch-lowenc") == f"{study.MIM_PLANS}_MiM_win-175_250"
    # the default MiM-network arms fine-tune on the task window, each pre-trained arm with its own checkpoint's
    # plans; the *-hu1000 diagnostics keep the checkpoint's window
    s.s = study.Settings(arms=study.DEFAULT_ARMS + ("MiM-hu1000", "scratch-hu1000"))
    assert s.plans_name("scratch") == s.plans_name("MiM") == f"{study.MIM_PLANS}_MiM_win-175_250"
    assert s.plans_name("MAE") == f"{study.MIM_PLANS}_MAE_win-175_250" and s.source("MAE") == "MAE"
    assert s.plans_name("MiM-hu1000") == s.plans_name("scratch-hu1000") == f"{study.MIM_PLANS}_MiM"
    assert s.plans_name("nnUNet") == study.STOCK_PLANS
    # random init alone still needs a checkpoint's network: the default arms' first, so the same plans
    s.s = study.Settings(arms=("scratch",))
    assert s.pretrained_arms() == [study.PLANS_SOURCE] == ["MiM"]
    assert s.plans_name("scratch") == f"{study.MIM_PLANS}_MiM_win-175_250"
    s.s = study.Settings(arms=("nnUNet",))
    assert s.pretrained_arms() == []  # stock nnU-Net plans by itself


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, quick_study_stages):
    """``--quick``: data, pre-training, planning, fine-tuning, prediction, scoring and the report, twice
    (the second run finds every result and only re-builds the report). The first three stages ran once for the
    session (conftest.py, the same Study methods main calls): main resumes from a copy of their folder."""
    study = _study_module()
    out = tmp_path / "study"
    shutil.copytree(quick_study_stages, out)
    assert study.main(["--quick", "--out", str(out)]) == 0
    s = study.Settings(**study.QUICK)
    report = json.loads((out / "study.json").read_text())
    assert report["complete"] and len(report["runs"]) == len(s.arms) * len(s.ks) * len(s.seeds)
    assert {c["arm"] for c in report["cells"]} == set(s.arms) and {c["k"] for c in report["cells"]} == set(
        s.ks
    )
    for c in report["cells"]:
        assert 0.0 <= c["dice_mean"] <= 1.0 and 0.0 <= c["nsd_mean"] <= 1.0
    md = (out / "study.md").read_text()
    for arm in s.arms:
        for k in s.ks:
            assert f"| {arm} | {k} | 1 |" in md
    assert (out / "study_dice_vs_k.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert study.main(["--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps  # resumed, not re-run


def test_splits_keep_existing_folds_when_other_ks_are_planned(tmp_path):
    """A run with other ks on the same work folder (a diagnostic arm at k=2 only) must not renumber the folds."""
    study = _study_module()
    raw = tmp_path / "nnUNet_raw" / study.DATASET
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"numTraining": 10}))
    (tmp_path / "nnUNet_preprocessed" / study.DATASET).mkdir(parents=True)
    full = study.Study(tmp_path, study.Settings(ks=(2, 8)))
    full.write_splits()
    assert (full.fold(2), full.fold(8)) == (0, 1)
    assert full.split(8) == {"train": [f"MiMStudy_tr{i:03d}" for i in range(8)], "val": ["MiMStudy_tr008", "MiMStudy_tr009"]}
    sub = study.Study(tmp_path, study.Settings(ks=(8, 4)))
    sub.write_splits()
    assert (sub.fold(2), sub.fold(8), sub.fold(4)) == (0, 1, 2)
    with pytest.raises(ValueError, match="k=9: the dataset has 10 labeled cases, 2 of them for validation"):
        sub.split(9)
    with pytest.raises(RuntimeError, match="no fold for k=3"):
        sub.fold(3)


def _stock_arm_folders(study, tmp_path: Path) -> None:
    """A raw dataset.json (10 training cases, one organ) and the stock plans: enough for Study.finetune with
    ``_run`` and the evaluation monkeypatched."""
    raw = tmp_path / "nnUNet_raw" / study.DATASET
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"numTraining": 10, "labels": {"background": 0, "liver": 1}}))
    pre = tmp_path / "nnUNet_preprocessed" / study.DATASET
    pre.mkdir(parents=True)
    (pre / f"{study.STOCK_PLANS}.json").write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [8, 8, 8]}}}))


def test_resumed_run_does_not_report_a_partial_training_time(tmp_path, monkeypatch):
    """A run continued from checkpoint_latest.pth (``--c``) was timed only after the resume: no train time.
    And the stock arm's epochs: ``--stock-epochs``, or the other arms' for ``nnUNet-eqiter``."""
    import mim_nnunet.submission.evaluate as evaluate

    study = _study_module()
    _stock_arm_folders(study, tmp_path)
    st = study.Study(tmp_path, study.Settings(ks=(2,), seeds=(0,), arms=("nnUNet",)))
    st.write_splits()
    commands = []
    envs = []
    monkeypatch.setattr(study, "_run", lambda cmd, env, logfile: commands.append(cmd) or envs.append(env) or 42.0)
    monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a: {
        "n_cases": 1, "foreground_mean": {"Dice": 0.5, "NSD": 0.4}, "mean": {"1": {"Dice": 0.5, "NSD": 0.4}}})  # fmt: skip
    arm = study.ARMS["nnUNet"]
    model = (tmp_path / "runs" / "nnUNet_k2_s0_it50" / "nnUNet_results" / study.DATASET
             / f"{arm.trainer}__{study.STOCK_PLANS}__3d_fullres" / f"fold_{st.fold(2)}")  # fmt: skip
    model.mkdir(parents=True)
    (model / "checkpoint_latest.pth").write_bytes(b"")
    st.finetune("nnUNet", 2, 0)
    result = json.loads(st.result_path("nnUNet", 2, 0).read_text())
    assert commands[0][-1] == "--c" and len(commands) == 2  # resumed training, then prediction
    assert result["train_seconds"] is None and "42 s timed after the resume only" in result["train_seconds_note"]
    assert result["predict_seconds"] == 42.0 and result["per_organ"] == {"liver": {"Dice": 0.5, "NSD": 0.4}}
    # Without a checkpoint the whole training is timed and no note is written.
    (model / "checkpoint_latest.pth").unlink()
    st.finetune("nnUNet", 2, 1)
    fresh = json.loads(st.result_path("nnUNet", 2, 1).read_text())
    assert fresh["train_seconds"] == 42.0 and "train_seconds_note" not in fresh and "--c" not in commands[2]
    # The stock arm gets --stock-epochs (default 2: equal wall-clock), its diagnostic twin the others' epochs.
    assert envs[0]["MIM_NNUNET_STUDY_EPOCHS"] == "2" and result["iterations"] == 2 * study.Settings().iters
    st.finetune("nnUNet-eqiter", 2, 0)
    assert envs[-1]["MIM_NNUNET_STUDY_EPOCHS"] == str(study.Settings().epochs)
    assert json.loads(st.result_path("nnUNet-eqiter", 2, 0).read_text())["iterations"] == 200


def test_snapshots_are_scored_along_a_run_and_reported(tmp_path, monkeypatch):
    """``--snapshot-every``: the trainer keeps the weights every N iterations, the study scores each of them
    (one prediction per snapshot, then the final weights) and the report gets a table and a learning curve."""
    import mim_nnunet.submission.evaluate as evaluate

    study = _study_module()
    _stock_arm_folders(study, tmp_path)
    s = study.Settings(ks=(2,), seeds=(0,), arms=("nnUNet",), epochs=4, iters=5, snapshot_every=5, test=1,
                       stock_epochs=0)
    st = study.Study(tmp_path, s)
    st.write_splits()
    commands, envs = [], []
    monkeypatch.setattr(study, "_run", lambda cmd, env, logfile: commands.append(cmd) or envs.append(env) or 1.0)
    dice = iter([0.1, 0.2, 0.3, 0.35])
    monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a: (lambda d: {
        "n_cases": 1, "foreground_mean": {"Dice": d, "NSD": d}, "mean": {"1": {"Dice": d, "NSD": d}}})(next(dice)))  # fmt: skip
    st.finetune("nnUNet", 2, 0)
    assert envs[0]["MIM_NNUNET_STUDY_SNAPSHOT_EVERY"] == "1"  # epochs: 5 iterations / 5 per epoch
    chk = [c[c.index("-chk") + 1] for c in commands[1:]]
    assert chk == ["checkpoint_it5.pth", "checkpoint_it10.pth", "checkpoint_it15.pth", "checkpoint_final.pth"]
    result = json.loads(st.result_path("nnUNet", 2, 0).read_text())
    assert [p["iterations"] for p in result["snapshots"]] == [5, 10, 15] and result["iterations"] == 20
    assert result["foreground_mean"]["Dice"] == 0.35 and result["seeding"] == "every-batch-v1"
    report = study.build_report(tmp_path, s, tmp_path / "docs")
    md = (tmp_path / "docs" / "study.md").read_text()
    assert "| 5 | 10 | 15 | 20 |" in md and "| nnUNet k=2 seed 0 | 0.100 | 0.200 | 0.300 | 0.350 |" in md
    assert (tmp_path / "docs" / "study_learning_curve.png").read_bytes()[:4] == b"\x89PNG" and report["complete"]
    with pytest.raises(SystemExit):
        study.parse_args(["--snapshot-every", "7", "--iters", "5"])
