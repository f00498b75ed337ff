"""The classification study (benchmarks/study_classify.py): the case selection per class, the runs' commands,
the defaults, the report from run results, and ``--quick`` end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _module():
    return load_benchmark("study_classify")


CLASSES = ["normal", "common_pneumonia", "covid19_pneumonia"]


def test_per_class_split_k_per_class_disjoint_nested():
    mod = _module()
    labels = {f"c{i:02d}": CLASSES[(i * 7) % 3] for i in range(18)}  # 6 per class, mixed order
    four = mod.per_class_split(labels, CLASSES, 4, 2)
    one = mod.per_class_split(labels, CLASSES, 1, 2)
    for split, k in ((four, 4), (one, 1)):
        assert [sum(labels[c] == name for c in split["train"]) for name in CLASSES] == [k] * 3
        assert [sum(labels[c] == name for c in split["val"]) for name in CLASSES] == [2] * 3
        assert not set(split["train"]) & set(split["val"])
    assert one["val"] == four["val"] and set(one["train"]) < set(four["train"])  # same validation, nested k
    assert mod.per_class_split(dict(reversed(labels.items())), CLASSES, 4, 2) == four  # order of the table
    first_normal = sorted(c for c, cls in labels.items() if cls == "normal")[:4]
    assert set(first_normal) <= set(four["train"])
    with pytest.raises(ValueError, match=r"k=5 \+ val=2 cases of class 'normal': the dataset has 6"):
        mod.per_class_split(labels, CLASSES, 5, 2)


def test_equal_steps_for_every_k_and_the_run_commands(tmp_path):
    mod = _module()
    s = mod.ClassifySettings()
    assert mod.epochs_for(s.steps, 12, 2) == 40 and mod.epochs_for(s.steps, 48, 2) == 10
    assert mod.epochs_for(4, 3, 2) == 2  # 2 batches per epoch (the last one of 1 case)
    study = mod.ClassifyStudy(tmp_path, s)
    assert study.pretrained_arms() == ["MiM", "MAE"]
    assert mod.ClassifyStudy(tmp_path, mod.ClassifySettings(arms=("scratch",))).pretrained_arms() == ["MiM"]
    assert study.pretrain_options("MAE") == ("--spacing", "2.5", "2", "2", "--levels", "1")
    assert study.pretrain_options("MiM") == ("--spacing", "2.5", "2", "2")
    commands = {a: mod.train_command(s, a, tmp_path / "ds", tmp_path / "ck", tmp_path / "o", 1, 20, 7)
                for a in mod.ARMS}  # fmt: skip
    for arm, cmd in commands.items():
        assert cmd[:4] == [sys.executable, "-m", "mim_nnunet.cli.classify", "train"]
        line = " ".join(cmd)
        assert "--fold 1 " in line and "--epochs 20 --seed 7" in line and "--device cpu" in line
        assert "--batch-size 2 --input-size 64 64 64" in line
        assert ("--from-scratch" in cmd) == (arm == "scratch")
        assert ("--linear-probe" in cmd) == (arm == "MiM-probe")
    assert len(study.all_runs()) == 4 * 2 * 3


def test_one_fold_per_k_in_the_datasets_splits(tmp_path):
    """The plan stage writes the folds ``train --fold`` reads: one per k, found again by k, and a later call with
    other ks keeps the folds already there (their numbers name runs' folds)."""
    mod = _module()
    study = mod.ClassifyStudy(tmp_path, mod.ClassifySettings(ks=(2, 1), val=1))
    study.folder.mkdir(parents=True)
    (study.folder / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    rows = [f"case_{i:02d},{CLASSES[i % 3]}" for i in range(9)]
    (study.folder / "classesTr.csv").write_text("case,class\n" + "\n".join(rows) + "\n")
    study.plan()
    path = tmp_path / "nnUNet_preprocessed" / mod.DATASET / "splits_final.json"
    splits = json.loads(path.read_text())
    assert splits == [study.split(2), study.split(1)] and (study.fold(2), study.fold(1)) == (0, 1)
    assert splits[1] == {"train": ["case_00", "case_01", "case_02"], "val": ["case_06", "case_07", "case_08"]}
    again = mod.ClassifyStudy(tmp_path, mod.ClassifySettings(ks=(1,), val=1))
    again.plan()
    assert json.loads(path.read_text()) == splits and again.fold(1) == 1
    with pytest.raises(RuntimeError, match="no fold for k=3"):
        mod.ClassifyStudy(tmp_path, mod.ClassifySettings(ks=(3,), val=0)).fold(3)


def test_defaults_meet_the_requirement():
    mod = _module()
    a, s = mod.parse_args([])
    assert s.ks == (4, 16) and len(s.seeds) >= 3 and s.test >= 60 and s.test % 3 == 0
    assert set(s.arms) == {"MiM", "MAE", "scratch", "MiM-probe"} and s.preset == "tiny"
    assert mod.organ.ARMS["MAE"].pretrain_args == ("--levels", "1")
    assert mod.organ.ARMS["MiM"].pretrain_args == ()
    assert a.out == REPO / "work_dirs" / "study_classify" and a.report_dir == REPO / "docs" / "classify_study"
    q, qs = mod.parse_args(["--quick"])
    assert q.out == REPO / "work_dirs" / "study_classify_quick" and q.report_dir == q.out
    assert len(qs.seeds) == 2 and "scratch" in qs.arms and len(qs.arms) >= 2
    _, custom = mod.parse_args(["--arms", "MiM-probe", "scratch", "--seeds", "3", "--steps", "10"])
    assert custom.arms == ("MiM-probe", "scratch") and custom.seeds == (3,) and custom.steps == 10


def _fake_run(arm: str, k: int, seed: int, accuracy: float, auroc: float | None) -> dict:
    return {
        "arm": arm, "k": k, "seed": seed, "mode": "finetune", "checkpoint": "MiM", "train_cases": 3 * k,
        "epochs": 80, "steps": 480, "batch_size": 2, "input_size": [64] * 3, "n_test": 60, "accuracy": accuracy,
        "balanced_accuracy": accuracy, "f1_macro": accuracy - 0.1, "auroc_macro": auroc, "last_epoch": None,
        "train_seconds": 150.0, "predict_seconds": 35.0, "evaluate_seconds": 3.0,
    }  # fmt: skip


def test_report_from_partial_results(tmp_path):
    """Report from run results: accuracy and AUROC per arm and k, seed-paired and Welch cells against scratch,
    the missing arm and seed listed, the measured budget, the plot."""
    from scipy.stats import ttest_ind

    mod = _module()
    s = mod.ClassifySettings(ks=(4,), seeds=(0, 1, 2), arms=("MiM", "MAE", "scratch"))
    (tmp_path / "runs").mkdir()
    mim, scratch = [0.5, 0.6, 0.7], [0.4, 0.4, 0.6]
    for seed in s.seeds:
        for arm, acc in (("MiM", mim[seed]), ("scratch", scratch[seed])):
            run = _fake_run(arm, 4, seed, acc, acc + 0.2)
            (tmp_path / "runs" / f"{mod.run_id(s, arm, 4, seed)}.json").write_text(json.dumps(run))
    timings = {"corpus": 100.0, "dataset": 50.0, "pretrain:MiM": 400.0}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    report = mod.build_report(tmp_path, s, tmp_path / "docs")
    cell = next(c for c in report["cells"] if c["arm"] == "MiM")
    assert cell["metrics"]["accuracy"]["mean"] == pytest.approx(0.6)
    paired = cell["vs_baseline"]["accuracy"]["paired"]
    # differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.0577, t(2) = 4.303 -> half-width 0.1434
    assert paired["mean"] == pytest.approx(0.1333, abs=1e-4)
    assert paired["half_width"] == pytest.approx(0.1434, abs=1e-3)
    welch = cell["vs_baseline"]["auroc_macro"]["welch"]
    ci = ttest_ind([a + 0.2 for a in mim], [a + 0.2 for a in scratch], equal_var=False).confidence_interval()
    assert welch["ci95"] == pytest.approx([ci.low, ci.high])
    assert report["missing_runs"] == [f"MAE_k4_s{seed}_st{s.steps}" for seed in s.seeds] and not report["complete"]
    assert report["budget"]["seconds"] == {"data": 150.0, "pretrain": 400.0, "runs": 6 * 188.0,
                                           "total": 150.0 + 400.0 + 6 * 188.0}  # fmt: skip
    md = (tmp_path / "docs" / "study.md").read_text()
    for column in ("| arm | k per class | seeds | accuracy | macro AUROC | balanced accuracy | macro F1 |",
                   "paired accuracy - scratch [95 % CI], sd, seeds above", "Welch: accuracy - scratch",
                   "paired macro AUROC - scratch [95 % CI], sd, seeds above", "Welch: macro AUROC - scratch"):  # fmt: skip
        assert column in md, column
    assert "| MiM | 4 | 3 | 0.600 +- 0.100 | 0.800 +- 0.100 | 0.600 +- 0.100 | 0.500 +- 0.100 |" in md
    assert md.count("+0.133 [-0.010, +0.277], sd 0.058, 3/3 above") == 2  # accuracy and AUROC
    assert "| scratch | 4 | 3 | 0.467 +- 0.115 |" in md and "(baseline) | (baseline)" in md
    assert "| MAE | 4 | 0 | (missing) |" in md and "**Incomplete**: 3 of 9 runs missing" in md
    assert md.startswith("# Classification study") and "80 (480)" in md
    assert (tmp_path / "docs" / "study_scores_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    # an undefined AUROC (None in metrics.json) is left out of the mean, not taken as 0
    undefined = _fake_run("MiM", 4, 2, 0.7, None)
    (tmp_path / "runs" / f"{mod.run_id(s, 'MiM', 4, 2)}.json").write_text(json.dumps(undefined))
    again = next(c for c in mod.build_report(tmp_path, s, tmp_path / "docs")["cells"] if c["arm"] == "MiM")
    assert again["metrics"]["auroc_macro"]["mean"] == pytest.approx(0.75)


def _log_lines(out: Path) -> int:
    """The commands the study ran so far (each one is echoed into its log)."""
    logs = [*out.rglob("*.txt"), out / "commands.log"]
    return sum(p.read_text().count("\n$ ") for p in logs)


@pytest.mark.slow
def test_quick_classify_study_end_to_end(tmp_path):
    """``--quick``: the chest corpus and dataset, pre-training, the folds, training at two seeds, prediction,
    scores and the report; a second call runs nothing and only re-builds the report; a report of
    more seeds lists the missing runs."""
    mod = _module()
    out = tmp_path / "classify"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    s = mod.ClassifySettings(**mod.QUICK)
    report = json.loads((out / "study.json").read_text())
    assert report["complete"] and len(report["runs"]) == len(s.arms) * len(s.ks) * len(s.seeds)
    assert {(r["arm"], r["k"], r["seed"]) for r in report["runs"]} == {
        (a, k, seed) for a in s.arms for k in s.ks for seed in s.seeds
    }
    study = mod.ClassifyStudy(out, s)
    for r in report["runs"]:
        assert r["n_test"] == s.test and 0.0 <= r["accuracy"] <= 1.0 and r["steps"] >= s.steps
        assert r["auroc_macro"] is not None and r["train_seconds"] > 0
        assert r["last_epoch"]["epoch"] == r["epochs"]
        model = out / "runs" / mod.run_id(s, r["arm"], r["k"], r["seed"]) / "model"
        plan = json.loads((model / "plan.json").read_text())
        assert plan["fold"]["train"] == study.split(r["k"])["train"]  # the study's fold, k per class
        assert plan["plan"]["input_size"] == [s.input_size] * 3 and plan["options"]["seed"] == r["seed"]
        assert plan["plan"]["mode"] == mod.ARMS[r["arm"]].mode and plan["plan"]["spacing"] == list(s.spacing)
    for k in s.ks:
        cell = next(c for c in report["cells"] if c["arm"] == "MiM" and c["k"] == k)
        assert cell["vs_baseline"]["accuracy"]["paired"]["n"] == 2
        assert cell["vs_baseline"]["auroc_macro"]["welch"] is not None
    assert report["budget"]["seconds"]["pretrain"] > 0 and report["budget"]["seconds"]["runs"] > 0
    md = (out / "study.md").read_text()
    assert "paired accuracy - scratch [95 % CI], sd, seeds above" in md
    assert f"Complete: all {len(report['runs'])} runs." in md
    assert re.search(r"\| MiM \| 2 \| 2 \| .* above \|", md) and "| scratch | 2 | 2 |" in md
    assert (out / "study_scores_vs_k.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    commands = _log_lines(out)
    assert mod.main(["--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps  # resumed, not re-run
    assert _log_lines(out) == commands  # no stage ran a command
    assert mod.main(["--quick", "--out", str(out), "--report-only", "--seeds", "0", "1", "2"]) == 0
    report = json.loads((out / "study.json").read_text())
    missing = sorted(mod.run_id(s, a, k, 2) for a in s.arms for k in s.ks)
    assert sorted(report["missing_runs"]) == missing
    assert f"**Incomplete**: {len(missing)} of {3 * len(missing)} runs missing" in (out / "study.md").read_text()
