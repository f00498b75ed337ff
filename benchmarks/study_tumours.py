"""Tumour arm of the label-efficiency study: MiM, the MAE ablation and random init on liver-tumour phantoms.

The stages, the resume rules, the seeding and the trainers are those of ``study_label_efficiency.py`` (its
``Study``, subclassed here; see its docstring and docs/study.md). What this study changes:

- **data**: the same unlabeled corpus (100 phantoms, seed 0, default geometry) and, instead of the organ
  dataset, the MSD Task03-like liver-tumour dataset of the phantom generator
  (``phantoms.TASKS["liver-tumour"]``: liver 1, tumour 2, a quarter of each split's cases without a lesion,
  docs/tumours.md): ``max(k)`` + ``--val`` training cases and ``--test`` (20) held-out test cases;
- **arms**: MiM, MAE (``--levels 1``) and scratch (``ARMS`` of the organ study: the same network, recipe and
  fine-tuning window -175..250 HU), k in {4, 16}, seeds 0 1 2, 500 iterations each (the length probe's
  choice, docs/tumours.md);
- **scores** per run (the project's own scoring, ``mim_nnunet.submission.evaluate`` with a ``LesionSpec``,
  as ``mim_nnunet_submit evaluate --lesions 2``): tumour Dice (label 2, per case, nnU-Net's empty-mask
  convention: a case without tumour in reference and prediction is left out, a false tumour in a lesion-free
  case scores 0), liver Dice, lesion detection sensitivity (detected over reference lesions, pooled over the
  test cases; one-to-one matching at IoU >= 0.5, 26-connected components), false positives per case,
  lesion-wise Dice; and per lesion-size bin (``phantoms.LESION_SIZE_BINS_MM``, the equivalent-sphere
  diameter of the reference lesion, as ``phantoms.lesion_report`` measures it): lesion Dice (each reference
  lesion's Dice with its matched prediction, 0 when missed) and sensitivity;
- **report**: ``docs/tumours_study/study.md`` (a marked block), ``study.json`` and ``study_dice_vs_k.png``:
  mean +- sd over seeds, the seed-paired difference to scratch (mean, paired-t 95 % CI, sd, seeds above 0) and
  Welch's interval beside it, for tumour Dice, sensitivity and the lesion Dice of each size bin; with
  ``--snapshot-every`` also the scores along each run (tumour Dice, sensitivity, FP per case, liver Dice at
  each snapshot and at the end: a table, ``learning_curves`` in study.json and ``study_learning_curve.png``).

Pre-training: this study pre-trains its own MiM and MAE checkpoints in its own work folder. Its corpus and
pre-training settings are the organ study's, so the organ study's ``pretrain/MiM`` (and ``pretrain/MAE`` when it
has one) and ``corpus`` folders, copied into ``work_dirs/study_tumours/`` before the first run, are used instead
(a finished checkpoint is never re-trained).

Length: 500 iterations (20 epochs of 25). The length probe (one scratch run at k = 16 for 1000 iterations,
scored every 250, docs/tumours.md) found no tumour after 250 iterations (tumour Dice 0.004, sensitivity 0) and
0.26-0.39 Dice from 500 on: at the organ study's 200, a run would still be deciding whether it finds tumours at
all. Budget, measured in the probe alone on the 2-core CPU (AMD EPYC, AVX2): an epoch of 25 iterations
14.5-18.5 s, prediction of the 20 test cases 140-160 s; so a 500-iteration run ~8.5 min with start-ups and
scoring, 18 runs **about 2.5 h**, plus MAE pre-training (~2 min) with the MiM checkpoint and the corpus copied
in: over the 2 hours aimed at, because shorter runs would not find the tumours. 1000 iterations (~14 min a
run, ~4.3 h) does not fit.

    python benchmarks/study_tumours.py                     # the full study (~2.5 h on the 2-core CPU)
    python benchmarks/study_tumours.py --quick --out /tmp/tumour_quick
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# the organ study's machinery and the shared statistics, also when this file is loaded by its path (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_label_efficiency as organ  # noqa: E402
from study_stats import (  # noqa: E402
    COMPARISON_NOTE,
    compare,
    comparison_cells,
    format_mean_sd,
    mean_sd,
    plot_paired,
    summary,
    write_marked_block,
)

from mim_nnunet.data.phantoms import LESION_SIZE_BINS_MM, size_bin  # noqa: E402
from mim_nnunet.nnunet.seeding import SEEDING  # noqa: E402

REPO = organ.REPO
LIVER, TUMOUR = 1, 2  # the liver-tumour task's label values (MSD Task03's)
REPORT_BEGIN = "<!-- tumour-study-report:begin (written by benchmarks/study_tumours.py) -->"
REPORT_END = "<!-- tumour-study-report:end -->"
BASELINE = organ.BASELINE
#: the size bins, smallest first (labels of phantoms.size_bin)
SIZE_BINS = (size_bin(0.0), size_bin(LESION_SIZE_BINS_MM[0]), size_bin(LESION_SIZE_BINS_MM[1]))

#: the per-run scores the report summarises: cell key -> (column, path in the run result)
METRICS = {
    "tumour_dice": ("tumour Dice", ("tumour", "dice")),
    "liver_dice": ("liver Dice", ("per_organ", "liver", "Dice")),
    "sensitivity": ("lesion sensitivity", ("tumour", "sensitivity")),
    "fp_per_case": ("FP / case", ("tumour", "fp_per_case")),
    "lesion_dice": ("lesion-wise Dice", ("tumour", "lesion_dice")),
}
#: the scores compared with scratch (paired and Welch) in the main table
COMPARED = ("tumour_dice", "sensitivity")
#: the scores along a run (``--snapshot-every``): in the learning-curve table, and those plotted
CURVE_TABLE = {m: METRICS[m] for m in ("tumour_dice", "sensitivity", "fp_per_case", "liver_dice")}
CURVE_PLOT = {m: METRICS[m] for m in ("tumour_dice", "sensitivity")}


@dataclass
class TumourSettings(organ.Settings):
    ks: tuple[int, ...] = (4, 16)
    epochs: int = 20  # x iters (25) = 500 iterations: the length probe's choice (module docstring)
    test: int = 20
    arms: tuple[str, ...] = ("MiM", "MAE", "scratch")


#: ``--quick``: the same code path at toy sizes; two seeds, so that the paired and Welch cells are exercised; the
#: prediction in-process (``Settings.predict_processes``)
QUICK = dict(
    corpus=4, ks=(2,), val=1, test=2, seeds=(0, 1), arms=("MiM", "scratch"), pretrain_steps=3, epochs=1,
    iters=3, shape_mm=(80.0, 80.0, 80.0), stock_epochs=None, predict_processes=0,
)  # fmt: skip


def sphere_diameter_mm(volume_mm3: float) -> float:
    """The diameter of the sphere of that volume: how ``phantoms.lesion_report`` sizes a lesion."""
    return float((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0))


def size_bin_scores(lesions: list[dict]) -> dict[str, dict]:
    """Per size bin of the reference lesions (rows with ``diameter_mm``, ``detected``, ``dice``): their
    number, how many were detected, sensitivity and mean lesion Dice (a missed lesion scores 0); NaN for an
    empty bin."""
    out = {}
    for b in SIZE_BINS:
        rows = [r for r in lesions if size_bin(r["diameter_mm"]) == b]
        n, found = len(rows), sum(r["detected"] for r in rows)
        out[b] = {"n": n, "detected": found, "sensitivity": found / n if n else math.nan,
                  "dice": float(np.mean([r["dice"] for r in rows])) if n else math.nan}  # fmt: skip
    return out


def tumour_scores(ev: dict) -> dict:
    """The run result's scores, from an ``evaluate_folders`` result with the tumour label's lesion scores."""
    key = str(TUMOUR)
    names = {t["key"]: t["name"] for t in ev["targets"]}
    les = ev["lesions"]["mean"][key]
    lesions = [
        {"case": c["case"], "diameter_mm": sphere_diameter_mm(r["volume_mm3"]), "detected": r["detected"],
         "dice": r["dice"]}
        for c in ev["per_case"] for r in c["lesions"][key]["reference_lesions"]
    ]  # fmt: skip
    return {
        "n_test": ev["n_cases"],
        "foreground_mean": ev["foreground_mean"],
        "per_organ": {names[k]: v for k, v in ev["mean"].items()},
        "tumour": {
            "dice": ev["mean"][key]["Dice"],
            "nsd": ev["mean"][key]["NSD"],
            "sensitivity": les["pooled_sensitivity"],
            "sensitivity_case_mean": les["sensitivity"],
            "fp_per_case": les["fp_per_case"],
            "lesion_dice": les["lesion_dice"],
            "matched_dice": les["matched_dice"],
            "n_ref": les["n_ref"],
            "tp": les["tp"],
            "fp": les["fp"],
            "cases_without_tumour": sum(c["lesions"][key]["n_ref"] == 0 for c in ev["per_case"]),
            "empty": ev["empty"],
            "iou_threshold": ev["lesions"]["iou_threshold"],
        },
        "size_bins": size_bin_scores(lesions),
        "reference_lesions": lesions,
        "case_tumour_dice": {c["case"]: c["metrics"][key]["Dice"] for c in ev["per_case"]},
    }


class TumourStudy(organ.Study):
    """The organ study's stages on the liver-tumour dataset, scored per tumour and per lesion."""

    task = "liver-tumour"
    dataset_id = 962
    name = "MiMTumourStudy"
    settings_cls = TumourSettings
    quick = QUICK
    work_name = "study_tumours"
    report_home = REPO / "docs" / "tumours_study"

    def evaluate(self, folder: Path) -> dict:
        from mim_nnunet.submission.evaluate import evaluate_folders, label_names
        from mim_nnunet.submission.lesions import LesionSpec

        labels = json.loads((self.raw / self.dataset / "dataset.json").read_text())["labels"]
        ev = evaluate_folders(
            folder, self.raw / self.dataset / "labelsTs", self.s.tolerance, labels=[LIVER, TUMOUR],
            names=label_names(labels), lesions=LesionSpec((str(TUMOUR),)),
        )  # fmt: skip
        return tumour_scores(ev)

    def build_report(self, report_dir: Path) -> dict:
        return build_report(self.out, self.s, report_dir)


# --- report -----------------------------------------------------------------------------------------------
def _cells(runs: list[dict], s: TumourSettings) -> list[dict]:
    """Per arm and k: each score's mean +- sd over seeds, also per size bin; then the comparisons with
    scratch."""
    cells = []
    for arm in s.arms:
        for k in s.ks:
            rs = sorted((r for r in runs if r["arm"] == arm and r["k"] == k), key=lambda r: r["seed"])
            if not rs:
                cells.append({"arm": arm, "k": k, "n_seeds": 0})
                continue
            cells.append({
                "arm": arm, "k": k, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
                "iterations": rs[0]["iterations"], "patch_size": rs[0]["patch_size"],
                "train_seconds_mean": mean_sd([r["train_seconds"] or np.nan for r in rs])[0],
                "predict_seconds_mean": mean_sd([r["predict_seconds"] for r in rs])[0],
                "metrics": {m: summary({r["seed"]: organ.score_at(r, path) for r in rs})
                            for m, (_, path) in METRICS.items()},
                "size_bins": {b: {
                    "n_lesions": rs[0]["size_bins"][b]["n"],
                    "dice": summary({r["seed"]: r["size_bins"][b]["dice"] for r in rs}),
                    "sensitivity": summary({r["seed"]: r["size_bins"][b]["sensitivity"] for r in rs}),
                } for b in SIZE_BINS},
            })  # fmt: skip
    for c in cells:
        base = next((b for b in cells if b["arm"] == BASELINE and b["k"] == c["k"]), None)
        if c["arm"] == BASELINE or not c["n_seeds"] or not base or not base["n_seeds"]:
            continue
        c["vs_baseline"] = {
            m: compare(c["metrics"][m]["per_seed"], base["metrics"][m]["per_seed"]) for m in COMPARED
        }
        for b in SIZE_BINS:
            c["size_bins"][b]["vs_baseline"] = compare(
                c["size_bins"][b]["dice"]["per_seed"], base["size_bins"][b]["dice"]["per_seed"]
            )
    return cells


def _main_table(cells: list[dict]) -> list[str]:
    cols = [METRICS[m][0] for m in METRICS]
    comp = []
    for m in COMPARED:
        label = METRICS[m][0]
        comp += [
            f"paired {label} - {BASELINE} [95 % CI], sd, seeds above",
            f"Welch: {label} - {BASELINE} [95 % CI]",
        ]
    head = ["arm", "k", "seeds", *cols, *comp, "iterations", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        if not c["n_seeds"]:
            lines.append(
                "| " + " | ".join([c["arm"], str(c["k"]), "0", "(missing)"] + [""] * (len(head) - 4)) + " |"
            )
            continue
        row = [c["arm"], str(c["k"]), str(c["n_seeds"])]
        row += [format_mean_sd(c["metrics"][m]["mean"], c["metrics"][m]["sd"]) for m in METRICS]
        for m in COMPARED:
            row += comparison_cells(c["arm"] == BASELINE, c.get("vs_baseline", {}).get(m))
        row += [str(c["iterations"]), f"{c['train_seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _size_bin_table(cells: list[dict]) -> list[str]:
    head = ["arm", "k", "lesion size", "lesions", "lesion Dice", "sensitivity",
            f"paired lesion Dice - {BASELINE} [95 % CI], sd, seeds above",
            f"Welch: lesion Dice - {BASELINE} [95 % CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        if not c["n_seeds"]:
            lines.append(f"| {c['arm']} | {c['k']} | (missing) |" + " |" * (len(head) - 3))
            continue
        for b in SIZE_BINS:
            cb = c["size_bins"][b]
            row = [c["arm"], str(c["k"]), b, str(cb["n_lesions"]),
                   format_mean_sd(cb["dice"]["mean"], cb["dice"]["sd"]),
                   format_mean_sd(cb["sensitivity"]["mean"], cb["sensitivity"]["sd"]),
                   *comparison_cells(c["arm"] == BASELINE, cb.get("vs_baseline"))]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _test_set_line(runs: list[dict]) -> str:
    """What the test set holds (the same for every run)."""
    if not runs:
        return "no run finished yet"
    r = runs[0]
    bins = ", ".join(f"{r['size_bins'][b]['n']} {b}" for b in SIZE_BINS)
    t = r["tumour"]
    return (f"{r['n_test']} held-out test cases, {t['cases_without_tumour']} of them without a lesion, "
            f"{t['n_ref']} reference lesions ({bins})")  # fmt: skip


def build_report(out: Path, s: TumourSettings, report_dir: Path) -> dict:
    """study.json, study.md (the marked block) and study_dice_vs_k.png from the run results under ``out``;
    with snapshots in a run, the learning-curve table and study_learning_curve.png too."""
    runs, missing, excluded = organ.collect_runs(out, s)
    cells = _cells(runs, s)
    curves = organ.learning_curves(runs, CURVE_TABLE)
    timings_file = out / "timings.json"
    report = {
        "settings": asdict(s),
        "arms": {
            a: {
                "label": organ.ARMS[a].label,
                "trainer": organ.ARMS[a].trainer,
                "pretrain_args": organ.ARMS[a].pretrain_args,
            }
            for a in s.arms
        },  # fmt: skip
        "size_bins_mm": list(LESION_SIZE_BINS_MM),
        "cells": cells,
        "learning_curves": curves,
        "runs": runs,
        "missing_runs": missing,
        "excluded_runs": excluded,
        "seeding": SEEDING,
        "complete": not missing,
        "timings_seconds": json.loads(timings_file.read_text()) if timings_file.is_file() else {},
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "study.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        REPORT_BEGIN,
        "",
        f"Liver-tumour phantoms (liver 1, tumour 2): {_test_set_line(runs)}; mean +- sd over seeds "
        f"{list(s.seeds)}; fine-tuning iterations per run in the table (equal for all arms). Pre-training: "
        f"preset {s.preset}, {s.pretrain_steps} steps of {s.pretrain_batch} crops on {s.corpus} phantoms.",
        "",
        *_main_table(cells),
        "",
        "Per lesion size (equivalent-sphere diameter of the reference lesion; all test cases' lesions pooled "
        "per run):",
        "",
        *_size_bin_table(cells),
        "",
        "Scores: **tumour Dice** is the Dice of label 2 per test case, averaged over the cases, by nnU-Net's "
        "empty-mask convention (a case with no tumour in the reference and none predicted is left out; a "
        "predicted tumour in a lesion-free case scores 0); **liver Dice** likewise for label 1. Lesions are "
        "the 26-connected components of label 2, a predicted lesion detects a reference lesion at IoU >= "
        "0.5, one-to-one (`mim_nnunet.submission.lesions`, as `mim_nnunet_submit evaluate --lesions 2`): "
        "**lesion sensitivity** = detected over reference lesions, all test cases pooled; **FP / case** = "
        "unmatched predicted lesions per test case; **lesion-wise Dice** = BraTS 2023's (mean over reference "
        "and false-positive lesions, a missed or a false one scoring 0), averaged over the cases. Per size "
        "bin: **lesion Dice** = the mean over the bin's reference lesions of each one's Dice with its "
        "matched prediction, 0 when missed (detection and delineation together), **sensitivity** = detected "
        "over the bin's lesions.",
        "",
        COMPARISON_NOTE.format(metric="score", baseline=BASELINE, seeding=SEEDING),
        "",
        "Arms: "
        + "; ".join(f"**{a}** = {organ.ARMS[a].label} (`{organ.ARMS[a].trainer}`)" for a in s.arms)
        + ".",
    ]
    if excluded:
        lines += ["", f"Not pooled (run before every batch was seeded, `{SEEDING}`; re-run them): "
                  + ", ".join(excluded) + "."]  # fmt: skip
    if missing:
        lines += ["", f"**Incomplete**: {len(missing)} of {len(missing) + len(runs)} runs missing: "
                  + ", ".join(missing) + "."]  # fmt: skip
    else:
        lines += ["", f"Complete: all {len(runs)} runs."]
    lines += ["", "![tumour Dice against k, lesion Dice per size, paired differences](study_dice_vs_k.png)"]
    if curves:
        lines += ["", organ.snapshot_table(curves, CURVE_TABLE, "Test scores"), "",
                  "![tumour Dice and sensitivity along each run](study_learning_curve.png)"]  # fmt: skip
    lines += ["", REPORT_END]
    write_marked_block(report_dir / "study.md", "\n".join(lines), REPORT_BEGIN, REPORT_END, "Tumour study")
    _plot(cells, s, report_dir / "study_dice_vs_k.png", len(missing))
    if curves:
        organ.plot_learning_curves(curves, report_dir / "study_learning_curve.png", CURVE_PLOT)
    return report


def _plot(cells: list[dict], s: TumourSettings, path: Path, n_missing: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, pax) = plt.subplots(1, 3, figsize=(15, 4))
    for i, arm in enumerate(s.arms):
        cs = [c for c in cells if c["arm"] == arm and c["n_seeds"]]
        if not cs:
            continue
        dodge = 1 + 0.03 * (i - len(s.arms) / 2)  # so that error bars at the same k do not hide each other
        ax.errorbar(np.asarray([c["k"] for c in cs], float) * dodge,
                    [c["metrics"]["tumour_dice"]["mean"] for c in cs],
                    yerr=[c["metrics"]["tumour_dice"]["sd"] for c in cs], marker="o", capsize=3,
                    label=f"{arm} (n={min(c['n_seeds'] for c in cs)})")  # fmt: skip
        for j, c in enumerate(cs):
            x = np.arange(len(SIZE_BINS)) + 0.06 * (i - len(s.arms) / 2)
            bx.errorbar(x, [c["size_bins"][b]["dice"]["mean"] for b in SIZE_BINS],
                        yerr=[c["size_bins"][b]["dice"]["sd"] for b in SIZE_BINS], marker="os^v"[j % 4],
                        color=f"C{i}", capsize=3, label=f"{arm} k={c['k']}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(s.ks), [str(k) for k in s.ks])
    ax.set_xlabel("labeled training cases k")
    ax.set_ylabel("tumour Dice (test cases)")
    ax.set_ylim(0, 1)
    ax.set_title(
        "tumour Dice against k" + ("" if not n_missing else f" (incomplete: {n_missing} runs missing)")
    )
    bx.set_xticks(range(len(SIZE_BINS)), list(SIZE_BINS))
    bx.set_xlabel("reference lesion diameter")
    bx.set_ylabel("lesion Dice (0 when missed)")
    bx.set_ylim(0, 1)
    bx.set_title("lesion Dice per size")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    groups = [(f"{c['arm']}\nk={c['k']}", (c.get("vs_baseline") or {}).get("tumour_dice", {}).get("paired"))
              for c in cells]  # fmt: skip
    plot_paired(pax, groups, f"tumour Dice - {BASELINE} (same seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return organ.main(argv, TumourStudy, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
