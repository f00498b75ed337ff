"""The tumour arm of the label-efficiency study (benchmarks/study_tumours.py) and the statistics it shares with
the organ study (benchmarks/study_stats.py): scores from real label files, the report from run results, the
defaults, and ``--quick`` end to end."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _module(name: str):
    return load_benchmark(name)


def test_shared_statistics_and_cells(tmp_path):
    st = _module("study_stats")
    assert st.mean_sd([0.5, 0.7]) == pytest.approx((0.6, 0.1414), abs=1e-4)
    assert st.mean_sd([math.nan, 0.5]) == (0.5, 0.0) and all(math.isnan(x) for x in st.mean_sd([math.nan]))
    # Welch: needs two values a side; no interval when neither side varies
    assert st.welch([0.5], [0.3, 0.4]) is None
    flat = st.welch([0.5, 0.5], [0.3, 0.3])
    assert flat == {"difference": pytest.approx(0.2), "ci95": None} and st.format_welch(flat) == "+0.200 (no spread)"
    # paired: a seed with a NaN on either side is left out; differences 0.2, 0.3 -> no CI with one seed
    p = st.paired({0: 0.5, 1: math.nan, 2: 0.6, 7: 0.9}, {0: 0.3, 1: 0.4, 2: 0.3})
    assert p["seeds"] == [0, 2] and p["mean"] == pytest.approx(0.25) and p["n_above"] == 2
    assert st.paired({0: 0.5}, {1: 0.5}) is None and st.format_paired(None) == ""
    one = st.paired({3: 0.2}, {3: 0.5})
    assert one["ci95"] is None and one["sd"] is None and st.format_paired(one) == "-0.300, 0/1 above"
    both = st.compare({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.3, 1: 0.5, 2: 0.3})
    assert set(both) == {"paired", "welch"} and both["paired"]["n"] == 3 and both["welch"]["ci95"] is not None
    assert st.format_mean_sd(math.nan, math.nan) == "-" and st.format_mean_sd(0.61234, 0.1) == "0.612 +- 0.100"
    # the marked block: a new page gets the title; the block is replaced in place; a page without markers gets it
    page = tmp_path / "page.md"
    st.write_marked_block(page, "<b>\none\n</b>", "<b>", "</b>", "Title")
    assert page.read_text() == "# Title\n\n<b>\none\n</b>"
    page.write_text("# T\n\nmine\n\n<b>\nold\n</b>\ntail\n")
    st.write_marked_block(page, "<b>\nnew\n</b>", "<b>", "</b>", "Title")
    assert page.read_text() == "# T\n\nmine\n\n<b>\nnew\n</b>\ntail\n"
    plain = tmp_path / "plain.md"
    plain.write_text("# P\n")
    st.write_marked_block(plain, "<b>\nx\n</b>", "<b>", "</b>", "Title")
    assert plain.read_text() == "# P\n\n<b>\nx\n</b>\n"


def _ball(shape, centre, radius: float) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def _write(path: Path, arr: np.ndarray) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))  # 1 mm voxels


def test_tumour_scores_from_label_files_bin_lesions_by_size(tmp_path):
    """Scores of real label files through the project's lesion scoring: a missed 6 mm lesion, a 14 mm and a
    26 mm one found exactly, one false positive, and a lesion-free case with no predicted tumour."""
    mod = _module("study_tumours")
    study = mod.TumourStudy(tmp_path, mod.TumourSettings())
    raw = tmp_path / "nnUNet_raw" / study.dataset
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "cancer": 2}}))
    shape = (80, 64, 64)
    liver = np.zeros(shape, bool)
    liver[2:78, 2:62, 2:62] = True
    small, mid, large = _ball(shape, (60, 15, 15), 3), _ball(shape, (55, 42, 42), 7), _ball(shape, (20, 32, 32), 13)
    false = _ball(shape, (62, 50, 10), 3)
    ref = liver.astype(np.uint8)
    ref[small | mid | large] = 2
    pred = liver.astype(np.uint8)
    pred[mid | large | false] = 2
    _write(raw / "labelsTs" / "liver_20.nii.gz", ref)
    _write(tmp_path / "pred" / "liver_20.nii.gz", pred)
    _write(raw / "labelsTs" / "liver_21.nii.gz", liver.astype(np.uint8))  # lesion-free, none predicted
    _write(tmp_path / "pred" / "liver_21.nii.gz", liver.astype(np.uint8))
    scores = study.evaluate(tmp_path / "pred")
    t = scores["tumour"]
    assert (t["n_ref"], t["tp"], t["fp"], t["cases_without_tumour"]) == (3, 2, 1, 1)
    assert t["sensitivity"] == pytest.approx(2 / 3) and t["fp_per_case"] == pytest.approx(0.5)
    # tumour Dice: the lesion-free case without predicted tumour is left out (NaN), so the mean is case 0's
    r, p = ref == 2, pred == 2
    assert t["dice"] == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()))
    assert math.isnan(scores["case_tumour_dice"]["liver_21.nii.gz"])
    assert t["lesion_dice"] == pytest.approx(2 / 4)  # BraTS: (0 + 1 + 1) over 3 reference + 1 false lesions
    assert set(scores["per_organ"]) == {"liver", "cancer"} and scores["n_test"] == 2
    bins = scores["size_bins"]
    assert list(bins) == ["< 10 mm", "10-20 mm", ">= 20 mm"]
    assert bins["< 10 mm"] == {"n": 1, "detected": 0, "sensitivity": 0.0, "dice": 0.0}
    assert bins["10-20 mm"] == {"n": 1, "detected": 1, "sensitivity": 1.0, "dice": 1.0}
    assert bins[">= 20 mm"]["n"] == 1 and bins[">= 20 mm"]["dice"] == pytest.approx(1.0)
    diameters = sorted(x["diameter_mm"] for x in scores["reference_lesions"])
    assert diameters == pytest.approx([6.0, 14.0, 26.0], abs=0.6)  # the sphere of each lesion's volume


def _fake_run(mod, arm: str, k: int, seed: int, dice: float, small_dice: float) -> dict:
    bins = {"< 10 mm": {"n": 5, "detected": 1, "sensitivity": 0.2, "dice": small_dice},
            "10-20 mm": {"n": 4, "detected": 3, "sensitivity": 0.75, "dice": 0.6},
            ">= 20 mm": {"n": 0, "detected": 0, "sensitivity": math.nan, "dice": math.nan}}  # fmt: skip
    return {
        "arm": arm, "k": k, "seed": seed, "trainer": "T", "plans": "P", "seeding": "every-batch-v1",
        "iterations": 500, "train_seconds": 180.0, "predict_seconds": 150.0, "n_test": 20, "tolerance_mm": 2.0,
        "foreground_mean": {"Dice": 0.5, "NSD": 0.5},
        "per_organ": {"liver": {"Dice": 0.9, "NSD": 0.8}, "cancer": {"Dice": dice, "NSD": dice}},
        "tumour": {"dice": dice, "nsd": dice, "sensitivity": dice / 2, "sensitivity_case_mean": dice / 2,
                   "fp_per_case": 1.5, "lesion_dice": dice / 3, "matched_dice": 0.7, "n_ref": 9, "tp": 4, "fp": 30,
                   "cases_without_tumour": 5, "empty": "nan", "iou_threshold": 0.5},
        "size_bins": bins, "reference_lesions": [], "case_tumour_dice": {}, "patch_size": [48, 48, 64],
    }  # fmt: skip


def test_tumour_report_from_partial_results(tmp_path):
    """Report from run results: tumour columns, seed-paired and Welch cells against scratch, the size-bin table
    (an empty bin reads '-'), the missing arm listed."""
    from scipy.stats import ttest_ind

    mod = _module("study_tumours")
    s = mod.TumourSettings(ks=(4,), seeds=(0, 1, 2), arms=("MiM", "MAE", "scratch"))
    (tmp_path / "runs").mkdir()
    mim, scratch = [0.5, 0.6, 0.7], [0.4, 0.4, 0.6]
    for seed in s.seeds:
        for arm, dice, small in (("MiM", mim[seed], 0.3), ("scratch", scratch[seed], 0.1 * seed)):
            run = _fake_run(mod, arm, 4, seed, dice, small)
            (tmp_path / "runs" / f"{arm}_k4_s{seed}_it{s.epochs * s.iters}.json").write_text(json.dumps(run))
    report = mod.build_report(tmp_path, s, tmp_path / "docs")
    cell = next(c for c in report["cells"] if c["arm"] == "MiM")
    assert cell["metrics"]["tumour_dice"]["mean"] == pytest.approx(0.6)
    paired = cell["vs_baseline"]["tumour_dice"]["paired"]
    # differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.0577, t(2) = 4.303 -> half-width 0.1434
    assert paired["mean"] == pytest.approx(0.1333, abs=1e-4) and paired["half_width"] == pytest.approx(0.1434, abs=1e-3)
    welch = cell["vs_baseline"]["tumour_dice"]["welch"]
    ci = ttest_ind(mim, scratch, equal_var=False).confidence_interval(0.95)
    assert welch["ci95"] == pytest.approx([ci.low, ci.high])
    small = cell["size_bins"]["< 10 mm"]["vs_baseline"]["paired"]
    assert small["mean"] == pytest.approx(0.2) and small["n_above"] == 3  # 0.3 against 0.0, 0.1, 0.2
    assert cell["size_bins"][">= 20 mm"]["vs_baseline"]["paired"] is None  # no lesion of that size
    md = (tmp_path / "docs" / "study.md").read_text()
    for column in ("tumour Dice", "liver Dice", "lesion sensitivity", "FP / case", "lesion-wise Dice",
                   "paired tumour Dice - scratch [95 % CI], sd, seeds above", "Welch: tumour Dice - scratch",
                   "paired lesion sensitivity - scratch", "Welch: lesion sensitivity - scratch"):  # fmt: skip
        assert column in md, column
    assert "| MiM | 4 | 3 | 0.600 +- 0.100 | 0.900 +- 0.000 | 0.300 +- 0.050 |" in md
    assert "+0.133 [-0.010, +0.277], sd 0.058, 3/3 above" in md
    assert "| MAE | 4 | 0 | (missing) |" in md and "**Incomplete**: 3 of 9 runs missing" in md
    assert "| arm | k | lesion size | lesions | lesion Dice | sensitivity |" in md
    assert "| MiM | 4 | < 10 mm | 5 | 0.300 +- 0.000 | 0.200 +- 0.000 | +0.200 [" in md
    assert "| MiM | 4 | >= 20 mm | 0 | - | - |" in md and "| scratch | 4 | 10-20 mm | 4 |" in md
    assert "20 held-out test cases, 5 of them without a lesion, 9 reference lesions" in md
    assert "| MAE | 4 | (missing) |" in md
    assert json.loads((tmp_path / "docs" / "study.json").read_text())["missing_runs"] == report["missing_runs"]
    assert (tmp_path / "docs" / "study_dice_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "study_learning_curve" not in md and not (tmp_path / "docs" / "study_learning_curve.png").exists()
    assert report["learning_curves"] == []


def test_tumour_learning_curve_report_from_snapshots(tmp_path):
    """The length probe's command: its run is apart from the study's 500-iteration ones (run name, settings
    file, report folder) and plans like them; its snapshots become a table (tumour Dice, sensitivity, FP per
    case, liver Dice at each snapshot and at the end), study.json's learning_curves and a PNG."""
    mod = _module("study_tumours")
    probe = ["--arms", "scratch", "--ks", "16", "--seeds", "0", "--epochs", "40", "--iters", "25",
             "--snapshot-every", "250", "--report-dir", "docs/tumours_study/probe_it1000"]  # fmt: skip
    a, s = mod.organ.parse_args(probe, mod.TumourStudy)
    assert a.out == REPO / "work_dirs" / "study_tumours" and a.report_dir.name == "probe_it1000"
    assert a.report_dir != REPO / "docs" / "tumours_study"
    assert (s.snapshot_every, s.test, s.val, s.epochs * s.iters) == (250, 20, 2, 1000)
    design = mod.TumourStudy(tmp_path / "design", mod.TumourSettings())
    study = mod.TumourStudy(tmp_path, s)
    assert study.run_id("scratch", 16, 0) == "scratch_k16_s0_it1000" != design.run_id("scratch", 16, 0)
    assert study.pretrained_arms() == ["MiM"] and study.plans_name("scratch") == design.plans_name("scratch")
    s.arms = ("MiM", "scratch")  # a run without snapshots has no curve
    (tmp_path / "runs").mkdir()
    mim = _fake_run(mod, "MiM", 16, 0, 0.6, 0.3) | {"iterations": 1000}
    (tmp_path / "runs" / "MiM_k16_s0_it1000.json").write_text(json.dumps(mim))
    run = _fake_run(mod, "scratch", 16, 0, 0.52, 0.1) | {"iterations": 1000}
    kept = ("foreground_mean", "per_organ", "tumour", "size_bins", "reference_lesions", "case_tumour_dice")
    run["snapshots"] = []
    for it, dice, fp in ((250, 0.2, 9.0), (500, 0.4, 4.0), (750, 0.5, 2.5)):
        snap = _fake_run(mod, "scratch", 16, 0, dice, 0.1)
        snap["tumour"]["fp_per_case"], snap["per_organ"]["liver"]["Dice"] = fp, 0.8
        run["snapshots"].append({"iterations": it, **{key: snap[key] for key in kept}})
    (tmp_path / "runs" / "scratch_k16_s0_it1000.json").write_text(json.dumps(run))
    report = mod.build_report(tmp_path, s, tmp_path / "docs")
    md = (tmp_path / "docs" / "study.md").read_text()
    assert "| run | score | 250 | 500 | 750 | 1000 |" in md
    assert "| scratch k=16 seed 0 | tumour Dice | 0.200 | 0.400 | 0.500 | 0.520 |" in md
    assert "| scratch k=16 seed 0 | lesion sensitivity | 0.100 | 0.200 | 0.250 | 0.260 |" in md
    assert "| scratch k=16 seed 0 | FP / case | 9.000 | 4.000 | 2.500 | 1.500 |" in md
    assert "| scratch k=16 seed 0 | liver Dice | 0.800 | 0.800 | 0.800 | 0.900 |" in md
    assert "| MiM k=16 seed 0 |" not in md and "](study_learning_curve.png)" in md
    curves = json.loads((tmp_path / "docs" / "study.json").read_text())["learning_curves"]
    assert curves == report["learning_curves"] and len(curves) == 1
    assert curves[0]["iterations"] == [250, 500, 750, 1000]
    assert set(curves[0]["scores"]) == set(mod.CURVE_TABLE)
    assert curves[0]["scores"]["tumour_dice"] == pytest.approx([0.2, 0.4, 0.5, 0.52])
    assert (tmp_path / "docs" / "study_learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_tumour_study_defaults_and_case_names(tmp_path):
    """The requirement's sizes are the defaults; the work and report folders are the study's own; folds name
    the liver-tumour dataset's cases."""
    mod = _module("study_tumours")
    a, s = mod.organ.parse_args([], mod.TumourStudy)
    assert s.ks == (4, 16) and s.seeds == (0, 1, 2) and s.arms == ("MiM", "MAE", "scratch") and s.test >= 20
    assert s.epochs * s.iters == 500 and (s.corpus, s.data_seed, s.shape_mm) == (100, 0, None)  # organ corpus
    assert a.out == REPO / "work_dirs" / "study_tumours" and a.report_dir == REPO / "docs" / "tumours_study"
    q, qs = mod.organ.parse_args(["--quick"], mod.TumourStudy)
    assert q.out == REPO / "work_dirs" / "study_tumours_quick" and q.report_dir == q.out and len(qs.seeds) == 2
    study = mod.TumourStudy(tmp_path, s)
    assert len(study.all_runs()) == 18 and study.pretrained_arms() == ["MiM", "MAE"]
    raw = tmp_path / "nnUNet_raw" / study.dataset
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"numTraining": 18}))
    assert study.split(4) == {"train": [f"liver_{i}" for i in range(4)], "val": ["liver_16", "liver_17"]}
    organ = mod.organ.Study(tmp_path / "organ", mod.organ.Settings())
    assert organ.dataset == mod.organ.DATASET and organ.case_name(3) == "MiMStudy_tr003"


@pytest.mark.slow
def test_quick_tumour_study_end_to_end(tmp_path, quick_study_stages):
    """``--quick``: data, pre-training, planning, fine-tuning at two seeds, prediction, tumour and lesion scores
    and the report; a second call finds every result and only re-builds the report. The corpus and the MiM
    checkpoint are the organ study's ``--quick`` ones (conftest.py; the same settings, checked here), copied in as
    the module docstring of study_tumours.py says to: pre-training is the organ study's code, run once."""
    mod = _module("study_tumours")
    s = mod.TumourSettings(**mod.QUICK)
    organ = mod.organ.Settings(**mod.organ.QUICK)
    shared = ("corpus", "shape_mm", "data_seed", "preset", "pretrain_steps", "pretrain_batch", "pretrain_lr")
    assert {f: getattr(s, f) for f in shared} == {f: getattr(organ, f) for f in shared}
    out = tmp_path / "tumours"
    for folder in ("corpus", "pretrain"):
        shutil.copytree(quick_study_stages / folder, out / folder)
    assert mod.main(["--quick", "--out", str(out)]) == 0
    report = json.loads((out / "study.json").read_text())
    assert report["complete"] and len(report["runs"]) == len(s.arms) * len(s.ks) * len(s.seeds)
    for r in report["runs"]:
        assert r["n_test"] == s.test and 0.0 <= r["tumour"]["dice"] <= 1.0
        assert set(r["size_bins"]) == set(mod.SIZE_BINS) and r["tumour"]["n_ref"] >= 1
    md = (out / "study.md").read_text()
    assert "paired tumour Dice - scratch [95 % CI], sd, seeds above" in md and "lesion sensitivity" in md
    assert re.search(r"\| MiM \| 2 \| 2 \| .* above \|", md) and "| scratch | 2 | 2 |" in md
    assert "| arm | k | lesion size | lesions |" in md and md.count("| MiM | 2 | < 10 mm |") == 1
    assert (out / "study_dice_vs_k.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert mod.main(["--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps  # resumed, not re-run
