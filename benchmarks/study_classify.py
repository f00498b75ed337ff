"""Classification study: does MiM pre-training help case-level disease classification when labels are scarce?

The chest phantoms of the CC-CCII-like task (``phantoms.CLASSIFICATION_TASKS["cc-ccii"]``: normal lungs, common
pneumonia as lobar consolidation, COVID-19 pneumonia as peripheral ground glass; docs/classification.md), with
the stages, the resume rules and the report format of the label-efficiency study (``study_label_efficiency.py``,
whose ``Study`` this subclasses; its pre-training stage is reused as it is):

1. data: an unlabeled chest corpus (``mim_nnunet_phantoms corpus --field chest``: ``--corpus`` phantoms whose
   lungs are normal or diseased in the classes' proportions, the disease recorded nowhere; the corpus's seed
   stream, so no case of the dataset below) and one classification dataset of ``3 x (max(k) + val)`` training
   cases and ``--test`` held-out test cases (imagesTs + classesTs.csv), the classes balanced in each split;
2. pre-training: MiM (3 levels + alignment) and the MAE ablation (``--levels 1``), the organ study's arms with
   its settings (preset tiny, 2000 steps of 2 crops, lr 1e-3, seed 0) except the spacing, 2.5 mm slices and
   2 mm in-plane (below), on one shared preprocessed cache;
3. planning: ``$nnUNet_preprocessed/<dataset>/splits_final.json``, which ``mim_nnunet_classify train --fold``
   reads: one fold per k, training on the first k cases of each class (in case order; k = 4 is inside k = 16)
   and validating on the last ``--val`` cases of each class, the same for every k (:func:`per_class_split`);
4. runs: for every arm, k and seed, ``mim_nnunet_classify train`` (CPU, its own process; the seed fixes the
   initialisation, the case order, every augmentation and drop-path draw, so the arms at one seed and k see
   the same batches), ``predict`` on the test images with the final checkpoint and ``evaluate`` against
   classesTs.csv (accuracy, balanced accuracy, macro F1, macro one-vs-rest AUROC, per class, confusion
   matrix), these two through the command's ``main`` in the study's process;
5. report: ``docs/classify_study/study.md`` (a marked block), ``study.json`` and ``study_scores_vs_k.png``:
   accuracy and AUROC mean +- sd over seeds per arm and k, the seed-paired difference to scratch (mean,
   paired-t 95 % CI, sd, seeds above 0) and Welch's interval beside it, the missing runs listed, and the
   measured time of every stage and run (``budget`` in study.json).

Arms: **MiM** (the MiM checkpoint, fine-tuned), **MAE** (the ``--levels 1`` checkpoint, fine-tuned),
**scratch** (``--from-scratch``: the identical network from random init; the MiM checkpoint only defines its
shape, spacing and window) and **MiM-probe** (``--linear-probe``: the MiM encoder frozen, the head trained).
Everything else is the command's default recipe (AdamW, lr 1e-4, 1e-3 for the probe, layer decay 0.75,
5 % warm-up then cosine, nnU-Net's augmentation, the checkpoint's window -1000..1000 HU): the study measures
the product as a user gets it, not a tuned variant.

Decisions:

- **Equal optimizer steps, not equal epochs**: ``--steps`` (240) batches of 2 for every arm and k, so k = 16
  gets no more optimisation than k = 4, only more distinct cases (40 epochs of 12 cases, 10 of 48). The
  organ study keeps its iterations equal over k the same way.
- **The final checkpoint is scored, the validation cases only draw the learning curves**: selecting
  ``checkpoint_best`` on 6 validation cases (2 per class) would pick an epoch by the noise of a handful of
  cases and give each arm a different, data-dependent schedule, and a user with 4 labeled cases per class has
  no such set to spare. The validation line of the last epoch is kept in each run result (loss, accuracy,
  AUROC), to see whether a run under- or over-fits. Training on ``--fold all`` instead would need one
  dataset per k (``all`` is every training case of the dataset).
- **64^3 at 2.5 mm (z) x 2 x 2 mm**: 160 x 128 x 128 mm, the lungs whole in all but the widest phantoms (the
  extent is drawn in 100-160 mm per axis; the lungs fill about 95 % of the field's height, so a 128 mm input
  would cut up to 12 mm of apex and base off the 40 % of cases taller than 135 mm, while sideways and backwards
  they stay within about 64 mm of the centre); the rest of a larger case (air, the body wall) is what the
  centre crop drops. 64^3 at batch 2 is what bench_classify measured; 80^3 at 2 mm would cost about twice. The
  pre-training uses the same spacing, so the encoder is fine-tuned at the scale it learned (the planner takes
  the checkpoint's spacing). Input and batch size are fixed (``--input-size``, ``--batch-size``) so that every
  arm and k runs the same network on the same tensors, whatever the planner's memory model would allow.

Budget, estimated (the study itself has not run yet) on the project's 2-core CPU (AMD EPYC). This study's own
classifier runs at full input size (64^3, batch 2, tiny, 2026-12-02 18:03-18:07 UTC, while another test suite
used about one of the two cores): 7.7 s per epoch of 3 fine-tuning steps with the two augmentation workers
(about 1.5 s per step; 1.6-2.3 s in the main process alone), 2.6 s per 3 linear-probe steps, about 2.5 s per
epoch for validation, the checkpoint pair and the progress plot, a chest phantom 0.85 s. bench_classify's
0.160 s is the network's step alone on random tensors: nnU-Net's 3D augmentation at 64^3, on one thread per
worker, is most of a step here. Halved for an idle CPU: a fine-tuning step ~0.75 s, a probe step ~0.45 s, the
epoch overhead ~1.2 s. Then: data ~3 min (214 phantoms); pre-training ~10 min (the organ study's MiM 466 s and
MAE 121 s at the same steps, batch and crop size, docs/study.md "Budget"); a fine-tuned run 240 x 0.75 s =
180 s of steps, 40 epochs x 1.2 s at k = 4 (10 at k = 16), preprocessing its 18 / 54 cases at ~0.4 s,
predicting 60 test cases at bench_classify's 0.53 s (32 s), one process start-up: ~273 s at k = 4, ~251 s at
k = 16; a probe run ~200 / ~179 s. 3 arms x 3 seeds x (273 + 251) s + 3 x (200 + 179) s ~98 min, **about
1 h 50 min in all**, uncertain by the load factor (tens of percent). Hence 240 steps (480 would take about
3 h). Every stage prints its elapsed time and study.json keeps the measured ones (``budget``).

Every finished stage and run leaves a file and is skipped when the command is run again; an interrupted
pre-training resumes with ``--resume``, an interrupted classifier run with ``mim_nnunet_classify train
--resume`` (it continues at the batch where it stopped, with the batches an uninterrupted run draws), a run
stopped after training re-predicts. ``--quick`` runs the same code path at toy sizes (CI).

    python benchmarks/study_classify.py                 # the full study (~2 h on the 2-core CPU)
    python benchmarks/study_classify.py --quick --out /tmp/classify_quick
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# the organ study's machinery and the shared statistics, also when this file is loaded by its path (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_label_efficiency as organ  # noqa: E402
from machine import cpu_model  # noqa: E402
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

from mim_nnunet.data.phantoms import CLASSIFICATION_TASKS  # noqa: E402
from mim_nnunet.pretrain.folder import CHECKPOINT_FINAL, METRICS, PLAN  # noqa: E402

REPO = organ.REPO
TASK = "cc-ccii"
DATASET_ID = 963
NAME = "MiMClassifyStudy"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
REPORT_BEGIN = "<!-- classify-study-report:begin (written by benchmarks/study_classify.py) -->"
REPORT_END = "<!-- classify-study-report:end -->"
PLOT = "study_scores_vs_k.png"
BASELINE = "scratch"
#: how the arms are paired, for the report's note
SEEDING = "mim_nnunet_classify train --seed"
log = logging.getLogger("study")


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: the pre-training arm whose checkpoint it starts from (from scratch: whose
    network it copies) and ``mim_nnunet_classify train``'s mode."""

    checkpoint: str  # a pre-training arm of the organ study's ARMS ("MiM", "MAE")
    mode: str  # finetune | scratch | linear_probe
    label: str


#: the arms, in report order
ARMS = {
    "MiM": Arm("MiM", "finetune", "MiM checkpoint (3 levels + alignment), fine-tuned"),
    "MAE": Arm("MAE", "finetune", "MAE ablation checkpoint (levels=1, no alignment), fine-tuned"),
    "scratch": Arm("MiM", "scratch", "the same network from random init (--from-scratch)"),
    "MiM-probe": Arm("MiM", "linear_probe", "MiM checkpoint, encoder frozen, head trained (--linear-probe)"),
}
MODE_FLAGS = {"finetune": (), "scratch": ("--from-scratch",), "linear_probe": ("--linear-probe",)}
#: the per-run scores the report summarises: key in metrics.json -> column
METRICS_SHOWN = {"accuracy": "accuracy", "auroc_macro": "macro AUROC", "balanced_accuracy": "balanced accuracy",
                 "f1_macro": "macro F1"}  # fmt: skip
#: the scores compared with scratch (paired and Welch)
COMPARED = ("accuracy", "auroc_macro")
CHANCE = {"accuracy": 1 / 3, "auroc_macro": 0.5}  # three balanced classes


@dataclass
class ClassifySettings:
    corpus: int = 100  # unlabeled chest phantoms for pre-training
    ks: tuple[int, ...] = (4, 16)  # labeled training cases per class
    val: int = 2  # validation cases per class (learning curves only: the final checkpoint is scored)
    test: int = 60  # held-out test cases (balanced: 20 per class)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    preset: str = "tiny"
    spacing: tuple[float, float, float] = (2.5, 2.0, 2.0)  # z y x mm: pre-training and (its checkpoint) classifying
    input_size: int = 64  # voxels per axis of the classifier's input
    batch_size: int = 2
    steps: int = 240  # optimizer steps per run (every arm and k; epochs follow from k); budget in the docstring
    pretrain_steps: int = 2000  # the organ study's
    pretrain_batch: int = 2
    pretrain_lr: float = 1e-3
    shape_mm: tuple[float, float, float] | None = None  # phantom extent; None: drawn per case (100-160 mm)
    phantom_spacing: tuple[float, float, float] | None = None  # None: drawn per case
    data_seed: int = 0


#: ``--quick``: the same code path at toy sizes; two seeds, so that the paired and Welch cells are exercised, and
#: one k (each run costs a classifier process start-up; the folds of several ks are tested without training)
QUICK = dict(
    corpus=4, ks=(2,), val=1, test=3, seeds=(0, 1), arms=("MiM", "scratch"), input_size=32, steps=4,
    pretrain_steps=2, shape_mm=(80.0, 80.0, 80.0), phantom_spacing=(2.0, 2.0, 2.0),
)  # fmt: skip


def per_class_split(labels: dict[str, str], classes: list[str], k: int, val: int) -> dict[str, list[str]]:
    """Training on the first ``k`` cases of each class (in case-name order), validating on the last ``val`` of
    each: the same validation cases for every k, and a smaller k's training cases inside a larger one's."""
    train, held = [], []
    for name in classes:
        cases = sorted(c for c, cls in labels.items() if cls == name)
        if k + val > len(cases):
            raise ValueError(f"k={k} + val={val} cases of class {name!r}: the dataset has {len(cases)}")
        train += cases[:k]
        held += cases[len(cases) - val :]
    return {"train": sorted(train), "val": sorted(held)}


def epochs_for(steps: int, n_train: int, batch: int) -> int:
    """Epochs of at least ``steps`` optimizer steps (an epoch is one pass over the ``n_train`` cases)."""
    return math.ceil(steps / math.ceil(n_train / batch))


def run_id(s: ClassifySettings, arm: str, k: int, seed: int) -> str:
    """A run's name: arm, k, seed and its steps (runs of several lengths share one work folder)."""
    return f"{arm}_k{k}_s{seed}_st{s.steps}"


def read_table(path: Path) -> dict[str, str]:
    """case -> class of a ``case,class`` table."""
    with open(path, newline="") as f:
        return {r["case"]: r["class"] for r in csv.DictReader(f)}


def train_command(s: ClassifySettings, arm: str, dataset: Path, checkpoint: Path, out: Path, fold: int,
                  epochs: int, seed: int) -> list[str]:  # fmt: skip
    """``mim_nnunet_classify train`` of one run (CPU, the study's input and batch size, the arm's mode)."""
    return organ._mim("classify") + [
        "train", "-i", str(dataset), "-pt", str(checkpoint), "-o", str(out), "--fold", str(fold),
        *MODE_FLAGS[ARMS[arm].mode], "--epochs", str(epochs), "--seed", str(seed),
        "--batch-size", str(s.batch_size), "--input-size", *[str(s.input_size)] * 3, "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip


def classify_in_process(argv: list[str], logfile: Path) -> float:
    """``mim_nnunet_classify predict`` or ``evaluate`` in this process (the command's own ``main``: what a user
    types, without the start-up of a Python with torch per call, which is most of their cost on the test set);
    echoed into ``logfile`` like a subprocess stage. Returns its wall time."""
    from mim_nnunet.cli.classify import main as classify_main

    line = shlex.join(["mim_nnunet_classify", *argv])
    log.info("$ %s", line)
    with open(logfile, "a") as f:
        f.write(f"\n$ {line}\n")
    t0 = time.perf_counter()
    try:
        status = classify_main(argv)
    except SystemExit as e:  # the command's one-line errors exit through argparse
        status = e.code
    if status:
        raise RuntimeError(f"stage failed (exit {status}): {line}")
    return time.perf_counter() - t0


class ClassifyStudy(organ.Study):
    """The organ study's stages on the chest classification phantoms, with ``mim_nnunet_classify`` runs."""

    task = TASK
    dataset_id = DATASET_ID
    name = NAME
    settings_cls = ClassifySettings
    quick = QUICK
    work_name = "study_classify"
    report_home = REPO / "docs" / "classify_study"

    @property
    def folder(self) -> Path:
        return self.raw / self.dataset

    # 1. data ---------------------------------------------------------------------------------------------------
    def data(self) -> None:
        from mim_nnunet.data.phantoms import write_classification_dataset, write_unlabeled_corpus

        s, t0 = self.s, time.perf_counter()
        corpus = self.out / "corpus"
        geometry = dict(shape_mm=s.shape_mm, spacing=s.phantom_spacing)
        if not (corpus / f"phantom_{s.corpus - 1:04d}.nii.gz").is_file():
            t = time.perf_counter()
            write_unlabeled_corpus(corpus, s.corpus, seed=s.data_seed, field="chest", **geometry)
            self._time("corpus", time.perf_counter() - t)
        if not (self.folder / "dataset.json").is_file():
            t = time.perf_counter()
            n_classes = len(CLASSIFICATION_TASKS[TASK].classes)
            write_classification_dataset(self.raw, self.dataset_id, self.name, n_classes * (max(s.ks) + s.val),
                                         s.test, seed=s.data_seed, task=TASK, **geometry)  # fmt: skip
            self._time("dataset", time.perf_counter() - t)
        log.info("stage data: %.0f s", time.perf_counter() - t0)

    # 2. pre-training (the organ study's stage) -----------------------------------------------------------------
    def pretrained_arms(self) -> list[str]:
        """The checkpoints the selected arms need (from scratch: the MiM checkpoint, for the network's shape)."""
        return list(dict.fromkeys(ARMS[a].checkpoint for a in self.s.arms))

    def pretrain_options(self, arm: str) -> tuple[str, ...]:
        return ("--spacing", *(f"{v:g}" for v in self.s.spacing), *organ.ARMS[arm].pretrain_args)

    def pretrain(self) -> None:
        t0 = time.perf_counter()
        super().pretrain()
        log.info("stage pretrain: %.0f s", time.perf_counter() - t0)

    # 3. planning: the folds ------------------------------------------------------------------------------------
    def classes(self) -> list[str]:
        return json.loads((self.folder / "dataset.json").read_text())["classes"]

    def split(self, k: int) -> dict:
        return per_class_split(read_table(self.folder / "classesTr.csv"), self.classes(), k, self.s.val)

    def plan(self) -> None:
        (self.pre / self.dataset).mkdir(parents=True, exist_ok=True)
        self.write_splits()  # the organ study's: one fold per k, folds already there kept

    def fold(self, k: int) -> int:
        splits = json.loads((self.pre / self.dataset / "splits_final.json").read_text())
        try:
            return splits.index(self.split(k))
        except ValueError:
            path = f"{self.dataset}/splits_final.json"
            raise RuntimeError(f"no fold for k={k} in {path}: run --stages plan") from None

    # 4. runs ---------------------------------------------------------------------------------------------------
    def run_id(self, arm: str, k: int, seed: int) -> str:
        return run_id(self.s, arm, k, seed)

    def epochs(self, k: int) -> int:
        return epochs_for(self.s.steps, k * len(self.classes()), self.s.batch_size)

    def finetune(self, arm: str, k: int, seed: int) -> None:
        if self.result_path(arm, k, seed).is_file():
            return
        s, rid = self.s, self.run_id(arm, k, seed)
        run = self.out / "runs" / rid
        model, logfile = run / "model", run / "log.txt"
        run.mkdir(parents=True, exist_ok=True)
        epochs, n_train = self.epochs(k), k * len(self.classes())
        train_s, note = None, None
        if not (model / CHECKPOINT_FINAL).is_file():
            resumed = (model / PLAN).is_file()
            cmd = train_command(s, arm, self.folder, self.checkpoint(ARMS[arm].checkpoint), model, self.fold(k),
                                epochs, seed) + (["--resume"] if resumed else [])  # fmt: skip
            train_s = organ._run(cmd, self.env, logfile)
            if resumed:  # only the part after the interruption was timed: not a run's training time
                note, train_s = f"resumed; {train_s:.0f} s timed after the resume only", None
        else:
            note = f"{CHECKPOINT_FINAL} existed (stopped before prediction): training not timed"
        predict_s = classify_in_process([
            "predict", "-m", str(model), "-i", str(self.folder / "imagesTs"), "-o", str(run / "predictions.csv"),
            "--device", "cpu", "--no-progress"], logfile)  # fmt: skip
        evaluate_s = classify_in_process([
            "evaluate", "-p", str(run / "predictions.csv"), "-r", str(self.folder / "classesTs.csv"),
            "-o", str(run / "evaluation" / "metrics.json")], logfile)  # fmt: skip
        m = json.loads((run / "evaluation" / "metrics.json").read_text())
        curve = [json.loads(line) for line in (model / METRICS).read_text().splitlines() if line.strip()]
        plan = json.loads((model / PLAN).read_text())["plan"]
        result = {
            "arm": arm, "k": k, "seed": seed, "mode": ARMS[arm].mode, "checkpoint": ARMS[arm].checkpoint,
            "train_cases": n_train, "epochs": epochs, "steps": epochs * math.ceil(n_train / s.batch_size),
            "batch_size": plan["batch_size"], "input_size": plan["input_size"], "spacing": plan["spacing"],
            "val_cases": s.val * len(self.classes()), "n_test": m["cases"],
            **{key: m[key] for key in ("accuracy", "balanced_accuracy", "f1_macro", "auroc_macro", "per_class",
                                       "confusion_matrix", "classes") if key in m},
            "last_epoch": curve[-1] if curve else None,
            "train_seconds": train_s, "predict_seconds": predict_s, "evaluate_seconds": evaluate_s,
            **({"train_seconds_note": note} if note else {}),
        }  # fmt: skip
        self.result_path(arm, k, seed).write_text(json.dumps(result, indent=2))
        log.info("run %s: train %s s, predict %.0f s, evaluate %.0f s; accuracy %.3f, AUROC %s", rid,
                 "-" if train_s is None else f"{train_s:.0f}", predict_s, evaluate_s, m["accuracy"],
                 "n/a" if m["auroc_macro"] is None else f"{m['auroc_macro']:.3f}")  # fmt: skip

    # 5. report -------------------------------------------------------------------------------------------------
    def build_report(self, report_dir: Path) -> dict:
        return build_report(self.out, self.s, report_dir)


# 5. report -----------------------------------------------------------------------------------------------------
def collect_runs(out: Path, s: ClassifySettings) -> tuple[list[dict], list[str]]:
    """The run results under ``out`` of the settings' arms, ks and seeds, and the ids of those missing."""
    runs, missing = [], []
    for seed in s.seeds:
        for k in s.ks:
            for arm in s.arms:
                p = out / "runs" / f"{run_id(s, arm, k, seed)}.json"
                if p.is_file():
                    runs.append(json.loads(p.read_text()))
                else:
                    missing.append(p.stem)
    return runs, missing


def _score(run: dict, key: str) -> float:
    value = run.get(key)
    return math.nan if value is None else float(value)


def cells(runs: list[dict], s: ClassifySettings) -> list[dict]:
    """Per arm and k: each score's mean +- sd over seeds, then the comparisons with scratch."""
    out = []
    for arm in s.arms:
        for k in s.ks:
            rs = sorted((r for r in runs if r["arm"] == arm and r["k"] == k), key=lambda r: r["seed"])
            if not rs:
                out.append({"arm": arm, "k": k, "n_seeds": 0})
                continue
            out.append({
                "arm": arm, "k": k, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
                "epochs": rs[0]["epochs"], "steps": rs[0]["steps"],
                "train_seconds_mean": mean_sd([r["train_seconds"] or np.nan for r in rs])[0],
                "predict_seconds_mean": mean_sd([r["predict_seconds"] for r in rs])[0],
                "metrics": {m: summary({r["seed"]: _score(r, m) for r in rs}) for m in METRICS_SHOWN},
            })  # fmt: skip
    for c in out:
        base = next((b for b in out if b["arm"] == BASELINE and b["k"] == c["k"]), None)
        if c["arm"] == BASELINE or not c["n_seeds"] or not base or not base["n_seeds"]:
            continue
        c["vs_baseline"] = {
            m: compare(c["metrics"][m]["per_seed"], base["metrics"][m]["per_seed"]) for m in COMPARED
        }
    return out


def budget(timings: dict, runs: list[dict]) -> dict:
    """The measured seconds of each stage (what was timed in this work folder; resumed runs count what ran after
    the resume only, and are named)."""
    run_s = [(r["train_seconds"] or 0.0) + r["predict_seconds"] + r["evaluate_seconds"] for r in runs]
    stages = {
        "data": sum(v for key, v in timings.items() if key in ("corpus", "dataset")),
        "pretrain": sum(v for key, v in timings.items() if key.startswith("pretrain:")),
        "runs": float(sum(run_s)),
    }
    return {"seconds": {**stages, "total": float(sum(stages.values()))},
            "per_run_seconds_mean": float(np.mean(run_s)) if run_s else None,
            "partly_timed_runs": [f"{r['arm']}_k{r['k']}_s{r['seed']}" for r in runs
                                  if r["train_seconds"] is None],
            "cpu": cpu_model()}  # fmt: skip


def _table(cs: list[dict]) -> list[str]:
    comp = []
    for m in COMPARED:
        comp += [f"paired {METRICS_SHOWN[m]} - {BASELINE} [95 % CI], sd, seeds above",
                 f"Welch: {METRICS_SHOWN[m]} - {BASELINE} [95 % CI]"]  # fmt: skip
    head = ["arm", "k per class", "seeds", *METRICS_SHOWN.values(), *comp, "epochs (steps)", "train s",
            "predict s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cs:
        if not c["n_seeds"]:
            row = [c["arm"], str(c["k"]), "0", "(missing)"] + [""] * (len(head) - 4)
            lines.append("| " + " | ".join(row) + " |")
            continue
        row = [c["arm"], str(c["k"]), str(c["n_seeds"])]
        row += [format_mean_sd(c["metrics"][m]["mean"], c["metrics"][m]["sd"]) for m in METRICS_SHOWN]
        for m in COMPARED:
            row += comparison_cells(c["arm"] == BASELINE, c.get("vs_baseline", {}).get(m))
        train = "-" if math.isnan(c["train_seconds_mean"]) else f"{c['train_seconds_mean']:.0f}"
        row += [f"{c['epochs']} ({c['steps']})", train, f"{c['predict_seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _mm(spacing) -> str:
    return " x ".join(f"{v:g}" for v in spacing) + " mm"


def _test_set_line(out: Path, s: ClassifySettings) -> str:
    path = out / "nnUNet_raw" / DATASET / "classesTs.csv"
    if not path.is_file():
        return f"{s.test} held-out test cases"
    found = Counter(read_table(path).values())
    counts = {c: found[c] for c in CLASSIFICATION_TASKS[TASK].classes if found[c]}
    return f"{sum(counts.values())} held-out test cases (" + ", ".join(f"{n} {c}" for c, n in counts.items()) + ")"


def build_report(out: Path, s: ClassifySettings, report_dir: Path) -> dict:
    """study.json, study.md (the marked block) and the plot from the run results under ``out``."""
    runs, missing = collect_runs(out, s)
    cs = cells(runs, s)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    report = {
        "settings": asdict(s),
        "arms": {a: asdict(ARMS[a]) | {"pretrain_args": organ.ARMS[ARMS[a].checkpoint].pretrain_args}
                 for a in s.arms},  # fmt: skip
        "cells": cs, "runs": runs, "missing_runs": missing, "complete": not missing, "seeding": SEEDING,
        "timings_seconds": timings, "budget": budget(timings, runs),
    }  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "study.json").write_text(json.dumps(report, indent=2, default=str))
    spent = report["budget"]["seconds"]
    lines = [
        REPORT_BEGIN,
        "",
        f"Chest phantoms (cc-ccii): {_test_set_line(out, s)}; k labeled training cases per class, mean +- sd "
        f"over seeds {list(s.seeds)}; {s.steps} optimizer steps of batch {s.batch_size} per run for every arm "
        f"and k (the epochs in the table), input {s.input_size}^3 at {_mm(s.spacing)} (z y x), the final checkpoint "
        f"scored. Pre-training: preset {s.preset}, {s.pretrain_steps} steps of {s.pretrain_batch} crops on "
        f"{s.corpus} unlabeled chest phantoms at {_mm(s.spacing)}. Chance: accuracy 1/3, AUROC 0.5.",
        "",
        *_table(cs),
        "",
        "Scores (`mim_nnunet_classify evaluate`, scikit-learn): **accuracy**; **macro AUROC** = the mean over "
        "the three classes of each one's one-vs-rest AUROC; **balanced accuracy** = the mean recall over the "
        "classes; **macro F1**.",
        "",
        COMPARISON_NOTE.format(metric="score", baseline=BASELINE, seeding=SEEDING),
        "",
        "Arms: " + "; ".join(f"**{a}** = {ARMS[a].label}" for a in s.arms) + ".",
        "",
        f"Measured time: data {spent['data']:.0f} s, pre-training {spent['pretrain']:.0f} s, runs "
        f"{spent['runs']:.0f} s, {spent['total'] / 60:.0f} min in all ({report['budget']['cpu']}; what this work "
        "folder timed, study.json `budget`).",
    ]
    if missing:
        lines += ["", f"**Incomplete**: {len(missing)} of {len(missing) + len(runs)} runs missing: "
                  + ", ".join(missing) + "."]  # fmt: skip
    else:
        lines += ["", f"Complete: all {len(runs)} runs."]
    lines += ["", f"![accuracy and AUROC against k, and the paired differences]({PLOT})", "", REPORT_END]
    write_marked_block(report_dir / "study.md", "\n".join(lines), REPORT_BEGIN, REPORT_END, "Classification study")
    _plot(cs, s, report_dir / PLOT, len(missing))
    return report


def _plot(cs: list[dict], s: ClassifySettings, path: Path, n_missing: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, m in enumerate(COMPARED):
        ax = axes[0, col]
        for i, arm in enumerate(s.arms):
            mine = [c for c in cs if c["arm"] == arm and c["n_seeds"]]
            if not mine:
                continue
            dodge = 1 + 0.03 * (i - len(s.arms) / 2)  # so that error bars at the same k do not hide each other
            ax.errorbar(np.asarray([c["k"] for c in mine], float) * dodge, [c["metrics"][m]["mean"] for c in mine],
                        yerr=[c["metrics"][m]["sd"] for c in mine], marker="o", capsize=3,
                        label=f"{arm} (n={min(c['n_seeds'] for c in mine)})")  # fmt: skip
        ax.axhline(CHANCE[m], color="grey", ls="--", lw=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(s.ks), [str(k) for k in s.ks])
        ax.set_xlim(min(s.ks) / 1.5, max(s.ks) * 1.5)  # also with one k, whose two dodged points set no range
        ax.set_xlabel("labeled training cases per class k")
        ax.set_ylabel(METRICS_SHOWN[m])
        ax.set_ylim(0, 1)
        incomplete = f" (incomplete: {n_missing} runs missing)" if n_missing else ""
        ax.set_title(f"{METRICS_SHOWN[m]} against k{incomplete}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        groups = [(f"{c['arm']}\nk={c['k']}", (c.get("vs_baseline") or {}).get(m, {}).get("paired")) for c in cs]
        plot_paired(axes[1, col], groups, f"{METRICS_SHOWN[m]} - {BASELINE} (same seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None, study: type[ClassifyStudy] = ClassifyStudy,
               description: str | None = None) -> tuple[argparse.Namespace, ClassifySettings]:  # fmt: skip
    d, q = ClassifySettings(), ClassifySettings(**QUICK)
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"toy sizes, {len(q.seeds)} seeds, arms {' '.join(q.arms)}: the same code path")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help=f"work folder (default work_dirs/{study.work_name}, its _quick twin with --quick)")  # fmt: skip
    p.add_argument("--report-dir", type=Path, default=None,
                   help="study.md/.json/.png (default docs/classify_study/, the work folder with --quick)")  # fmt: skip
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help=f"default: {' '.join(d.arms)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, d.seeds))}")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help=f"labeled training cases per class (default {' '.join(map(str, d.ks))})")  # fmt: skip
    p.add_argument("--corpus", type=int, default=None, help=f"unlabeled chest phantoms (default {d.corpus})")
    p.add_argument("--test", type=int, default=None, help=f"held-out test cases (default {d.test})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--pretrain-steps", type=int, default=None, help=f"default {d.pretrain_steps}")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing results")
    stages = ["data", "pretrain", "plan", "finetune", "report"]
    p.add_argument("--stages", nargs="+", default=stages, choices=stages, help="stages to run (default all)")
    a = p.parse_args(argv)
    s = q if a.quick else d
    for name in ("arms", "seeds", "ks"):
        if getattr(a, name) is not None:
            setattr(s, name, tuple(getattr(a, name)))
    for name in ("corpus", "test", "steps", "pretrain_steps"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    work = REPO / "work_dirs" / (f"{study.work_name}_quick" if a.quick else study.work_name)
    a.out = (a.out or work).resolve()
    a.report_dir = (a.report_dir or (a.out if a.quick else study.report_home)).resolve()
    return a, s


def main(argv: list[str] | None = None) -> int:
    return organ.main(argv, ClassifyStudy, __doc__, parse_args)


if __name__ == "__main__":
    raise SystemExit(main())
