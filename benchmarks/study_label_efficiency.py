"""Label-efficiency study: does MiM pre-training help when labels are scarce, and against what?

On the embedded synthetic phantoms, with fixed seeds:

1. data: an unlabeled corpus (``--corpus``) and one labeled nnU-Net dataset whose training cases are the first
   ``max(k)`` cases plus ``--val`` validation cases, and ``--test`` held-out test cases (imagesTs/labelsTs);
2. pre-training: one run per pre-trained arm (``ARMS[...].pretrain_args``), all with the same preset and the same
   number of optimizer steps, on one shared preprocessed cache;
3. planning: MiM plans per (checkpoint, fine-tuning window) the arms need (``--window``; the MiM-network arms
   fine-tune on ``TASK_WINDOW``), plans with the same window sharing one preprocessed copy of the data; stock
   nnU-Net planned by its own planner at the MiM
   spacing with a small memory target (``--stock-memory-target``); ``splits_final.json`` has one fold per k
   (fold i trains on the first ``k_i`` cases, all folds validate on the same ``--val`` cases);
4. fine-tuning: for every arm, k and seed, ``nnUNetv2_train`` with the arm's study trainer
   (``mim_nnunet.nnunet.study_trainers``: equal iterations, seed from the environment), each run in its own
   ``nnUNet_results`` folder, then ``nnUNetv2_predict`` on the test set (CPU, ``--disable_tta``) and
   ``mim_nnunet.submission.evaluate`` (Dice, NSD at ``--tolerance`` mm, per organ and foreground mean);
5. report: ``study.md`` (table), ``study.json`` and ``study_dice_vs_k.png``, re-built from whatever run results
   exist, with the missing runs listed.

Every finished stage leaves a file and is skipped when the command is run again (an interrupted study resumes:
pre-training with ``--resume``, nnU-Net with ``--c``). ``--quick`` runs the same code path at toy sizes (CI).

    python benchmarks/study_label_efficiency.py                 # the full study (docs/study.md: ~2.6 h on the 2-core CPU)
    python benchmarks/study_label_efficiency.py --quick --out /tmp/study_quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mim_nnunet.nnunet.seeding import SEEDING
from mim_nnunet.nnunet.study_trainers import snapshot_name

# the shared statistics (benchmarks/study_stats.py), also when this file is loaded by its path (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_stats import (  # noqa: E402
    COMPARISON_NOTE,
    format_paired,
    format_welch,
    mean_sd,
    paired,
    plot_paired,
    welch,
    write_marked_block,
)

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 961
NAME = "MiMStudy"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
MIM_PLANS = "MiMPlans_study"
STOCK_PLANS = "nnUNetPlans_study"
REPORT_BEGIN = "<!-- study-report:begin (written by benchmarks/study_label_efficiency.py) -->"
REPORT_END = "<!-- study-report:end -->"

log = logging.getLogger("study")


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: how its encoder is pre-trained (None: not at all) and how it is fine-tuned."""

    trainer: str
    pretrain_args: tuple[str, ...] | None = None  # extra mim_nnunet_pretrain options; None = no pre-training
    plans: str = "mim"  # "mim": MiM plans (the checkpoint's network); "stock": nnU-Net's own plans
    label: str = ""
    source: str | None = None  # fine-tune this arm's checkpoint (and plans) instead of pre-training one
    window: tuple[float, float] | None = None  # fine-tuning HU window (planner --window); None: the checkpoint's
    equal_iterations: bool = False  # a stock arm that ignores --stock-epochs (the other arms' iterations)


#: The fine-tuning HU window of the MiM-network arms: the paper's task window for abdominal organs (BTCV). The
#: planner's default, the checkpoint's pre-training window (-1000..1000), costs about 0.2 Dice on the phantoms
#: (docs/study.md, diagnostics): the arms ``*-hu1000`` keep it.
TASK_WINDOW = (-175.0, 250.0)

#: The arms, in report order. Adding an arm is one entry. "MiM-EMA" is there because the paper's alignment
#: heads collapse on the phantoms (docs/benchmarks.md, "Alignment collapse").
ARMS: dict[str, Arm] = {
    "MiM": Arm("nnUNetTrainerMiM_study", (), window=TASK_WINDOW, label="MiM (3 levels + alignment)"),
    "MiM-EMA": Arm(
        "nnUNetTrainerMiM_study", ("--align-target", "ema"), window=TASK_WINDOW,
        label="MiM, EMA alignment target (BYOL-style)",
    ),
    "MAE": Arm(
        "nnUNetTrainerMiM_study", ("--levels", "1"), window=TASK_WINDOW, label="MAE ablation (levels=1, no alignment)"
    ),
    "scratch": Arm("nnUNetTrainerMiM_scratch_study", None, window=TASK_WINDOW, label="same network, random init"),
    "nnUNet": Arm("nnUNetTrainerStock_study", None, plans="stock", label="stock nnU-Net"),
    "nnUNet-eqiter": Arm(
        "nnUNetTrainerStock_study", None, plans="stock", equal_iterations=True,
        label="stock nnU-Net at the other arms' iterations (diagnostic; ~21 min per run on the 2-core CPU)",
    ),
    # diagnostic arms (docs/study.md, diagnostics; not in the default study)
    "MiM-lowenc": Arm(
        "nnUNetTrainerMiM_lowenc_study", source="MiM", window=TASK_WINDOW,
        label="MiM checkpoint, encoder lr x 0.1 (diagnostic)",
    ),
    "scratch-lowenc": Arm(
        "nnUNetTrainerMiM_scratch_lowenc_study", None, window=TASK_WINDOW,
        label="random init, encoder lr x 0.1 (diagnostic)",
    ),
    "MiM-hu1000": Arm(
        "nnUNetTrainerMiM_study", source="MiM", label="MiM checkpoint, pre-training window -1000..1000 (diagnostic)"
    ),
    "scratch-hu1000": Arm(
        "nnUNetTrainerMiM_scratch_study", None, label="random init, window -1000..1000 (diagnostic)"
    ),
    "MiM-hu1000-lowenc": Arm(
        "nnUNetTrainerMiM_lowenc_study", source="MiM",
        label="MiM checkpoint, window -1000..1000, encoder lr x 0.1 (diagnostic)",
    ),
    "scratch-hu1000-lowenc": Arm(
        "nnUNetTrainerMiM_scratch_lowenc_study", None,
        label="random init, window -1000..1000, encoder lr x 0.1 (diagnostic)",
    ),
}  # fmt: skip
#: the study's arms when ``--arms`` is not given (the diagnostic arms are opt-in)
DEFAULT_ARMS = ("MiM", "MiM-EMA", "MAE", "scratch", "nnUNet")
#: the checkpoint whose network (and MiM plans) an arm from random init takes when no pre-trained arm is selected:
#: the default arms' first, so that ``--arms scratch`` alone fine-tunes with the same plans as the full study
PLANS_SOURCE = "MiM"


@dataclass
class Settings:
    corpus: int = 100
    ks: tuple[int, ...] = (2, 8)
    val: int = 2
    test: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    preset: str = "tiny"
    pretrain_steps: int = 2000  # 40 epochs of the 100-phantom corpus; budget in docs/study.md
    pretrain_batch: int = 2
    pretrain_lr: float = 1e-3
    epochs: int = 8  # x iters = 200 iterations for every arm (budget in docs/study.md)
    iters: int = 25
    # Stock nnU-Net's epochs. Its iteration costs ~7x a MiM-network iteration on the 2-core CPU (about 5.7 s
    # against 0.8 s, epochs of 25 with a validation batch), so 200 iterations (~21 min per run, about 4 h for the
    # study) do not fit: 2 epochs (50 iterations, ~260 s) are the MiM runs' training wall-clock (140-220 s)
    # rounded up to whole epochs, in stock's favour.
    # None or 0: the other arms' iterations. docs/study.md, "Budget".
    stock_epochs: int | None = 2
    mim_memory_target: float = 0.75
    stock_memory_target: float = 0.5  # nnU-Net planner: 56x48x56 here, about the MiM patch volume (docs)
    tolerance: float = 2.0
    # Also score the weights every this many iterations of each run (0: only the final weights): the test Dice
    # against iterations, to see where a run has converged. A multiple of ``iters``.
    snapshot_every: int = 0
    # nnUNetv2_predict's worker processes (-npp and -nps): 1 each, nnU-Net's own way; 0: its sequential,
    # in-process prediction (``--quick``: each worker is a process start-up that imports torch again)
    predict_processes: int = 1
    shape_mm: tuple[float, float, float] | None = None  # None: the phantoms' default (drawn per case)
    data_seed: int = 0


#: ``--quick``: every stage at toy sizes, the MiM arm on two folds (k = 1 and 2): 2 runs, each an nnU-Net training
#: and prediction (mostly process start-ups at this size; the prediction in-process). The scratch arm and the
#: comparison with it run in the tumour study's ``--quick`` (study_tumours.py: MiM and scratch at two seeds, the
#: same Study stages).
QUICK = dict(
    corpus=4, ks=(1, 2), val=1, test=1, seeds=(0,), arms=("MiM",), pretrain_steps=3, epochs=1,
    iters=3, shape_mm=(80.0, 80.0, 80.0), stock_epochs=None, predict_processes=0,
)  # fmt: skip


def arm_epochs(s: Settings, arm: str) -> int:
    """The arm's fine-tuning epochs: the study's, except the stock arm's equal wall-clock (``--stock-epochs``)."""
    a = ARMS[arm]
    return s.stock_epochs if a.plans == "stock" and s.stock_epochs and not a.equal_iterations else s.epochs


def run_id(s: Settings, arm: str, k: int, seed: int) -> str:
    """A run's name: arm, k, seed and its iterations (runs of several lengths share one work folder)."""
    return f"{arm}_k{k}_s{seed}_it{arm_epochs(s, arm) * s.iters}"


def _run(cmd: list[str], env: dict, logfile: Path) -> float:
    """Run one stage as a subprocess (its command echoed into ``logfile``); returns its wall time."""
    log.info("$ %s", shlex.join(cmd))
    t0 = time.perf_counter()
    with open(logfile, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        res = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        raise RuntimeError(f"stage failed (exit {res.returncode}), see {logfile}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def _exe(name: str) -> str:
    """A console script of this interpreter's environment (nnU-Net's), or ``python -m`` for ours."""
    return str(Path(sys.executable).parent / name)


def _mim(module: str) -> list[str]:
    return [sys.executable, "-m", f"mim_nnunet.cli.{module}"]


class Study:
    """The stages of one study in one work folder. A study of another task subclasses it and changes the class
    attributes below (``benchmarks/study_tumours.py``), and :meth:`evaluate` and :meth:`build_report`."""

    task = "organs"  # the dataset's phantoms.TASKS entry
    dataset_id = DATASET_ID
    name = NAME
    settings_cls: type[Settings] = Settings
    quick: dict = QUICK  # --quick: Settings(**quick)
    work_name = "study"  # work_dirs/<work_name>, and <work_name>_quick with --quick
    report_home = REPO / "docs"  # the report's folder without --report-dir

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    def __init__(self, out: Path, s: Settings):
        from mim_nnunet.nnunet.paths import ensure_ext_trainer

        self.out, self.s = out, s
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw = out / "nnUNet_raw"
        self.pre = out / "nnUNet_preprocessed"
        self.env = dict(os.environ)
        self.env.update(
            nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre), nnUNet_results=str(out / "unused"),
            nnUNet_n_proc_DA=self.env.get("nnUNet_n_proc_DA", "2"), MPLBACKEND="Agg",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")])),
        )  # fmt: skip
        ensure_ext_trainer(self.env)
        self.logfile = out / "commands.log"
        self.timings_file = out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}

    def _time(self, key: str, seconds: float) -> None:
        self.timings[key] = round(seconds, 1)
        self.timings_file.write_text(json.dumps(self.timings, indent=2))

    # 1. data ---------------------------------------------------------------------------------------------------
    def data(self) -> None:
        from mim_nnunet.data.phantoms import write_nnunet_dataset, write_unlabeled_corpus

        s = self.s
        corpus = self.out / "corpus"
        if not (corpus / f"phantom_{s.corpus - 1:04d}.nii.gz").is_file():
            t0 = time.perf_counter()
            write_unlabeled_corpus(corpus, s.corpus, seed=s.data_seed, shape_mm=s.shape_mm)
            self._time("corpus", time.perf_counter() - t0)
        if not (self.raw / self.dataset / "dataset.json").is_file():
            t0 = time.perf_counter()
            write_nnunet_dataset(
                self.raw, self.dataset_id, self.name, max(s.ks) + s.val, s.test, seed=s.data_seed,
                shape_mm=s.shape_mm, task=self.task,
            )  # fmt: skip
            self._time("dataset", time.perf_counter() - t0)

    # 2. pre-training -------------------------------------------------------------------------------------------
    def checkpoint(self, arm: str) -> Path:
        return self.out / "pretrain" / arm / "checkpoint_final.safetensors"

    def pretrained_arms(self) -> list[str]:
        """Arms whose pre-training runs: those of the selected arms, and the sources the others fine-tune; with
        none of them, ``PLANS_SOURCE`` when an arm from random init needs MiM plans (``--arms scratch``)."""
        names: list[str] = []
        for a in self.s.arms:
            src = ARMS[a].source or (a if ARMS[a].pretrain_args is not None else None)
            if src is not None and src not in names:
                names.append(src)
        if not names and any(ARMS[a].plans == "mim" for a in self.s.arms):
            names.append(PLANS_SOURCE)
        return names

    def pretrain_options(self, arm: str) -> tuple[str, ...]:
        """The pre-training arm's own ``mim_nnunet_pretrain`` options (a study of another task may add some)."""
        return ARMS[arm].pretrain_args

    def pretrain(self) -> None:
        s = self.s
        for arm in self.pretrained_arms():
            run = self.out / "pretrain" / arm
            if self.checkpoint(arm).is_file():
                continue
            cmd = _mim("pretrain") + [
                "-i", str(self.out / "corpus"), "-o", str(run), "--cache", str(self.out / "pretrain" / "cache"),
                "--preset", s.preset, "--max-steps", str(s.pretrain_steps), "--batch-size", str(s.pretrain_batch),
                "--lr", str(s.pretrain_lr), "--save-every", str(max(1, s.pretrain_steps // 4)), "--device", "cpu",
                "--seed", "0", "--no-progress", *self.pretrain_options(arm),
            ]  # fmt: skip
            if (run / "resume_state.pt").is_file():
                cmd.append("--resume")
            self._time(f"pretrain:{arm}", _run(cmd, self.env, self.logfile))

    # 3. planning -----------------------------------------------------------------------------------------------
    def source(self, arm: str) -> str:
        """The pre-trained arm whose checkpoint plans (and initialises) ``arm``."""
        return ARMS[arm].source or (arm if ARMS[arm].pretrain_args is not None else self.pretrained_arms()[0])

    def plans_name(self, arm: str) -> str:
        if ARMS[arm].plans == "stock":
            return STOCK_PLANS
        window = ARMS[arm].window
        return f"{MIM_PLANS}_{self.source(arm)}" + (f"_win{window[0]:g}_{window[1]:g}" if window else "")

    def plan(self) -> None:
        s = self.s
        folder = self.pre / self.dataset
        mim_arms = [a for a in s.arms if ARMS[a].plans == "mim"]
        needed: dict[str, tuple[str, tuple[float, float] | None]] = {}  # plans name -> (checkpoint arm, window)
        for arm in mim_arms:
            needed.setdefault(self.plans_name(arm), (self.source(arm), ARMS[arm].window))
        first: dict = {}  # window -> the first plans with it: later checkpoints share its preprocessed data
        for name, (source, window) in needed.items():
            path = folder / f"{name}.json"
            if path.is_file():
                first.setdefault(window, json.loads(path.read_text()))
                continue
            cmd = _mim("plan") + [
                "-d", str(self.dataset_id), "-pt", str(self.checkpoint(source)), "-np", "2", "-npfp", "2",
                "-gpu_memory_target", str(s.mim_memory_target), "-plans_name", name,
            ] + (["--window", *map(str, window)] if window else []) + (["--no_pp"] if window in first else [])  # fmt: skip
            self._time(f"plan:{name}", _run(cmd, self.env, self.logfile))
            plans = json.loads(path.read_text())
            if window not in first:
                first[window] = plans
            else:  # same network and preprocessing, another checkpoint: share the first plans' preprocessed data
                a, b = first[window]["configurations"]["3d_fullres"], plans["configurations"]["3d_fullres"]
                for key in ("spacing", "patch_size", "architecture", "normalization_schemes"):
                    if a[key] != b[key]:
                        raise RuntimeError(f"plans {name}: {key} {b[key]} differs from the first plans' {a[key]}")
                b["data_identifier"] = a["data_identifier"]
                path.write_text(json.dumps(plans, indent=2))
        first = next(iter(first.values()), None)
        if any(ARMS[a].plans == "stock" for a in s.arms) and not (folder / f"{STOCK_PLANS}.json").is_file():
            spacing = first["configurations"]["3d_fullres"]["spacing"] if first else [1.5, 1.5, 1.5]
            if not (folder / "dataset_fingerprint.json").is_file():
                _run([_exe("nnUNetv2_extract_fingerprint"), "-d", str(self.dataset_id), "-np", "2"], self.env,
                     self.logfile)  # fmt: skip
            t = _run(
                [_exe("nnUNetv2_plan_experiment"), "-d", str(self.dataset_id), "-gpu_memory_target",
                 str(s.stock_memory_target), "-overwrite_target_spacing", *map(str, spacing),
                 "-overwrite_plans_name", STOCK_PLANS], self.env, self.logfile)  # fmt: skip
            t += _run(
                [_exe("nnUNetv2_preprocess"), "-d", str(self.dataset_id), "-plans_name", STOCK_PLANS, "-c",
                 "3d_fullres", "-np", "2"], self.env, self.logfile)  # fmt: skip
            self._time("plan:stock", t)
        self.write_splits()

    def write_splits(self) -> None:
        """One fold per k: the first k training cases; the same validation cases for every fold. Folds already
        there are kept (a run of other ks or arms on the same work folder must not renumber them)."""
        path = self.pre / self.dataset / "splits_final.json"
        splits = json.loads(path.read_text()) if path.is_file() else []
        for k in self.s.ks:
            if self.split(k) not in splits:
                splits.append(self.split(k))
        path.write_text(json.dumps(splits, indent=2))

    def split(self, k: int) -> dict:
        """Train on the first k labeled cases, validate on the last ``--val`` (the same for every k)."""
        n = json.loads((self.raw / self.dataset / "dataset.json").read_text())["numTraining"]
        if k > n - self.s.val:
            raise ValueError(f"k={k}: the dataset has {n} labeled cases, {self.s.val} of them for validation")
        cases = [self.case_name(i) for i in range(n)]
        return {"train": cases[:k], "val": cases[n - self.s.val :]}

    def case_name(self, i: int) -> str:
        """The name of training case i, as the phantom generator writes it for the task."""
        from mim_nnunet.data.phantoms import TASKS

        return TASKS[self.task].case.format(name=self.name, split="tr", i=i, n=i)

    def fold(self, k: int) -> int:
        """The fold of ``splits_final.json`` that trains on the first k cases."""
        splits = json.loads((self.pre / self.dataset / "splits_final.json").read_text())
        try:
            return splits.index(self.split(k))
        except ValueError:
            raise RuntimeError(
                f"no fold for k={k} in {self.dataset}/splits_final.json: run --stages plan"
            ) from None

    # 4. fine-tuning, prediction, scoring -----------------------------------------------------------------------
    def run_id(self, arm: str, k: int, seed: int) -> str:
        return run_id(self.s, arm, k, seed)

    def result_path(self, arm: str, k: int, seed: int) -> Path:
        return self.out / "runs" / f"{self.run_id(arm, k, seed)}.json"

    def label_names(self) -> dict[int, str]:
        """{label value: name} of the dataset.json."""
        labels = json.loads((self.raw / self.dataset / "dataset.json").read_text())["labels"]
        return {v: n for n, v in labels.items()}

    def evaluate(self, folder: Path) -> dict:
        """The scores a run result keeps of one folder of test predictions: ``n_test``, ``foreground_mean``
        (Dice, NSD) and ``per_organ`` (by the dataset's label names); a study of another task adds its own."""
        from mim_nnunet.submission.evaluate import evaluate_folders

        ev = evaluate_folders(folder, self.raw / self.dataset / "labelsTs", self.s.tolerance)
        names = self.label_names()
        return {"n_test": ev["n_cases"], "foreground_mean": ev["foreground_mean"],
                "per_organ": {names[int(lbl)]: v for lbl, v in ev["mean"].items()}}  # fmt: skip

    def finetune(self, arm: str, k: int, seed: int) -> None:
        s, a = self.s, ARMS[arm]
        if self.result_path(arm, k, seed).is_file():
            return
        run = self.out / "runs" / self.run_id(arm, k, seed)
        results = run / "nnUNet_results"
        fold = self.fold(k)
        epochs = arm_epochs(s, arm)
        env = dict(self.env, nnUNet_results=str(results), MIM_NNUNET_STUDY_EPOCHS=str(epochs),
                   MIM_NNUNET_STUDY_ITERS=str(s.iters), MIM_NNUNET_STUDY_SEED=str(seed),
                   MIM_NNUNET_STUDY_SNAPSHOT_EVERY=str(s.snapshot_every // s.iters))  # fmt: skip
        plans = self.plans_name(arm)
        model = results / self.dataset / f"{a.trainer}__{plans}__3d_fullres" / f"fold_{fold}"
        logfile = run / "log.txt"
        run.mkdir(parents=True, exist_ok=True)
        train_s = predict_s = None
        note = None
        if not (model / "checkpoint_final.pth").is_file():
            cmd = [_exe("nnUNetv2_train"), str(self.dataset_id), "3d_fullres", str(fold), "-tr", a.trainer, "-p", plans,
                   "-device", "cpu"]  # fmt: skip
            resumed = (model / "checkpoint_latest.pth").is_file()
            if resumed:
                cmd.append("--c")
            train_s = _run(cmd, env, logfile)
            if resumed:  # only the part after the interruption was timed: not a run's training time
                note = f"resumed from checkpoint_latest.pth; {train_s:.0f} s timed after the resume only"
                train_s = None
        else:
            note = "checkpoint_final.pth existed (interrupted before prediction): training not timed"

        def predict(checkpoint: str, folder: Path) -> tuple[float, dict]:
            seconds = _run(
                [_exe("nnUNetv2_predict"), "-i", str(self.raw / self.dataset / "imagesTs"), "-o", str(folder),
                 "-d", str(self.dataset_id), "-c", "3d_fullres", "-f", str(fold), "-tr", a.trainer, "-p", plans,
                 "-device", "cpu", "--disable_tta", "-chk", checkpoint, "-npp", str(s.predict_processes),
                 "-nps", str(s.predict_processes)], env, logfile)  # fmt: skip
            return seconds, self.evaluate(folder)

        snapshots = []
        for it in range(s.snapshot_every, epochs * s.iters, s.snapshot_every) if s.snapshot_every else ():
            _, scores = predict(snapshot_name(it), run / f"predictions_it{it}")
            snapshots.append({"iterations": it, **{key: v for key, v in scores.items() if key != "n_test"}})
        predict_s, ev = predict("checkpoint_final.pth", run / "predictions")
        result = {
            "arm": arm, "k": k, "seed": seed, "trainer": a.trainer, "plans": plans, "seeding": SEEDING,
            "iterations": epochs * s.iters, "train_seconds": train_s, "predict_seconds": predict_s,
            **({"train_seconds_note": note} if note else {}),
            "tolerance_mm": s.tolerance, **ev,
            "patch_size": json.loads((self.pre / self.dataset / f"{plans}.json").read_text())["configurations"][
                "3d_fullres"]["patch_size"],
            **({"snapshots": snapshots} if snapshots else {}),
        }  # fmt: skip
        self.result_path(arm, k, seed).write_text(json.dumps(result, indent=2))
        log.info("%s: Dice %.3f NSD %.3f", self.run_id(arm, k, seed), *ev["foreground_mean"].values())

    def all_runs(self) -> list[tuple[str, int, int]]:
        """Seed outermost: an interrupted study has every arm and k at the same number of seeds."""
        return [(arm, k, seed) for seed in self.s.seeds for k in self.s.ks for arm in self.s.arms]

    # 5. report -------------------------------------------------------------------------------------------------
    def build_report(self, report_dir: Path) -> dict:
        """The report of the run results there are (:func:`build_report`)."""
        return build_report(self.out, self.s, report_dir)


# 5. report ---------------------------------------------------------------------------------------------------
def collect_runs(out: Path, s: Settings) -> tuple[list[dict], list[str], list[str]]:
    """The run results under ``out`` of the settings' arms, ks and seeds: (pooled results, missing run ids,
    excluded run ids). A result from before every batch was seeded is excluded (and counted missing)."""
    runs, missing, excluded = [], [], []
    for k in s.ks:
        for seed in s.seeds:
            for arm in s.arms:
                p = out / "runs" / f"{run_id(s, arm, k, seed)}.json"
                r = json.loads(p.read_text()) if p.is_file() else None
                if r is None:
                    missing.append(p.stem)
                elif r.get("seeding") != SEEDING:  # never pooled: its batches were not fixed by its seed
                    excluded.append(p.stem)
                    missing.append(p.stem)
                else:
                    runs.append(r)
    return runs, missing, excluded


def build_report(out: Path, s: Settings, report_dir: Path) -> dict:
    """study.json, study.md (the marked block) and study_dice_vs_k.png from the run results under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, missing, excluded = collect_runs(out, s)
    cells = []
    for arm in s.arms:
        for k in s.ks:
            rs = [r for r in runs if r["arm"] == arm and r["k"] == k]
            if not rs:
                cells.append({"arm": arm, "k": k, "n_seeds": 0})
                continue
            dice, nsd = (mean_sd([r["foreground_mean"][m] for r in rs]) for m in ("Dice", "NSD"))
            organs = {o: mean_sd([r["per_organ"][o]["Dice"] for r in rs])[0] for o in rs[0]["per_organ"]}
            cells.append({
                "arm": arm, "k": k, "n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs),
                "dice_mean": dice[0], "dice_sd": dice[1], "nsd_mean": nsd[0], "nsd_sd": nsd[1],
                "organ_dice_mean": organs,
                "train_seconds_mean": mean_sd([r["train_seconds"] or np.nan for r in rs])[0],
                "predict_seconds_mean": mean_sd([r["predict_seconds"] for r in rs])[0],
                "patch_size": rs[0]["patch_size"], "iterations": rs[0]["iterations"],
                "dice_per_seed": [r["foreground_mean"]["Dice"] for r in sorted(rs, key=lambda r: r["seed"])],
            })  # fmt: skip
    for c in cells:  # against the same network from random init, at the same k
        base = next((b for b in cells if b["arm"] == BASELINE and b["k"] == c["k"]), None)
        c.update(_against_baseline(c, base))
        c.update(_paired_against_baseline(c, base))
    timings_file = out / "timings.json"
    report = {
        "settings": asdict(s),
        "arms": {
            a: {
                "label": ARMS[a].label,
                "trainer": ARMS[a].trainer,
                "plans": ARMS[a].plans,
                "pretrain_args": ARMS[a].pretrain_args,
            }
            for a in s.arms
        },  # fmt: skip
        "cells": cells,
        "runs": runs,
        "missing_runs": missing,
        "excluded_runs": excluded,
        "seeding": SEEDING,
        "complete": not missing,
        "timings_seconds": json.loads(timings_file.read_text()) if timings_file.is_file() else {},
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "study.json").write_text(json.dumps(report, indent=2, default=str))

    # markdown block
    organs = sorted({o for c in cells for o in c.get("organ_dice_mean", {})})
    lines = [
        REPORT_BEGIN,
        "",
        f"Foreground mean over {s.test} held-out test phantoms, mean +- sd over seeds {list(s.seeds)}; "
        "fine-tuning iterations per run in the table"
        + (
            f" (the stock nnU-Net arm: {s.stock_epochs} epochs, about the other arms' training wall-clock, since "
            "equal iterations do not fit the budget, `--stock-epochs`)"
            if s.stock_epochs and s.stock_epochs != s.epochs and "nnUNet" in s.arms
            else " (equal for all arms)"
        )
        + f"; NSD at {s.tolerance:g} mm. "
        f"Pre-training: preset {s.preset}, {s.pretrain_steps} steps of {s.pretrain_batch} crops on "
        f"{s.corpus} phantoms.",
        "",
        "| arm | k | seeds | Dice | NSD | "
        + " | ".join(f"{o} Dice" for o in organs)
        + f" | paired Dice - {BASELINE} [95 % CI], sd, seeds above | Welch: Dice - {BASELINE} [95 % CI] "
        "| iterations | patch | train s |",
        "|---|---|---|---|---|" + "---|" * len(organs) + "---|---|---|---|---|",
    ]
    for c in cells:
        if not c["n_seeds"]:
            lines.append(f"| {c['arm']} | {c['k']} | 0 | (missing) | | " + "| " * len(organs) + "| | | | |")
            continue
        lines.append(
            f"| {c['arm']} | {c['k']} | {c['n_seeds']} | {c['dice_mean']:.3f} +- {c['dice_sd']:.3f} "
            f"| {c['nsd_mean']:.3f} +- {c['nsd_sd']:.3f} | "
            + " | ".join(f"{c['organ_dice_mean'].get(o, float('nan')):.3f}" for o in organs)
            + f" | {_format_paired(c)} | {_format_difference(c)} | {c['iterations']} "
            f"| {'x'.join(map(str, c['patch_size']))} "
            f"| {c['train_seconds_mean']:.0f} |"
        )
    lines += [
        "",
        COMPARISON_NOTE.format(metric="Dice", baseline=BASELINE, seeding=SEEDING),
        "",
        "Arms: " + "; ".join(f"**{a}** = {ARMS[a].label} (`{ARMS[a].trainer}`)" for a in s.arms) + ".",
    ]
    if excluded:
        lines += ["", f"Not pooled (run before every batch was seeded, `{SEEDING}`; re-run them): "
                  + ", ".join(excluded) + "."]  # fmt: skip
    if missing:
        lines += ["", f"**Incomplete**: {len(missing)} of {len(missing) + len(runs)} runs missing: "
                  + ", ".join(missing) + "."]  # fmt: skip
    else:
        lines += ["", f"Complete: all {len(runs)} runs."]
    lines += ["", "![Dice against k, and the paired differences](study_dice_vs_k.png)"]
    curves = learning_curves(runs)
    if curves:
        lines += ["", snapshot_table(curves), "", "![test Dice along each run](study_learning_curve.png)"]
    lines += ["", REPORT_END]
    write_marked_block(
        report_dir / "study.md", "\n".join(lines), REPORT_BEGIN, REPORT_END, "Label-efficiency study"
    )

    # plot
    fig, (ax, pax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(s.arms):
        cs = [c for c in cells if c["arm"] == arm and c["n_seeds"]]
        if cs:
            dodge = 1 + 0.03 * (
                i - len(s.arms) / 2
            )  # so that error bars at the same k do not hide each other
            x = np.asarray([c["k"] for c in cs], float) * dodge
            ax.errorbar(x, [c["dice_mean"] for c in cs], yerr=[c["dice_sd"] for c in cs], marker="o",
                        capsize=3, label=f"{arm}{_iterations_note(cs, s)} (n={min(c['n_seeds'] for c in cs)})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(s.ks), [str(k) for k in s.ks])
    ax.set_xlabel("labeled training cases k")
    ax.set_ylabel(f"foreground Dice ({s.test} test cases)")
    ax.set_ylim(0, 1)
    ax.set_title("Dice against k" + ("" if not missing else f" (incomplete: {len(missing)} runs missing)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _plot_paired(pax, cells, s)
    fig.tight_layout()
    fig.savefig(report_dir / "study_dice_vs_k.png", dpi=120)
    plt.close(fig)
    if curves:
        plot_learning_curves(curves, report_dir / "study_learning_curve.png")
    return report


def _plot_paired(ax, cells: list[dict], s: Settings) -> None:
    """Per arm and k: each seed's paired difference to the baseline (dots), their mean and 95 % CI (bar)."""
    groups = [(f"{c['arm']}\nk={c['k']}", c.get("paired")) for c in cells]
    plot_paired(ax, groups, f"Dice - {BASELINE} (same seed)")


#: the scores along a run (``--snapshot-every``) in the organ study's report: key -> (label, path in a run
#: result and in each of its snapshots); a study of another task passes its own (study_tumours.py)
CURVE_SCORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dice": ("foreground Dice", ("foreground_mean", "Dice")),
}


def score_at(result: dict, path: tuple[str, ...]) -> float:
    """The score at ``path`` (keys, outermost first) in a run result or a snapshot."""
    for part in path:
        result = result[part]
    return float(result)


def learning_curves(runs: list[dict], scores: dict = CURVE_SCORES) -> list[dict]:
    """Each run with snapshots: the iterations of its snapshots and of its final weights, and each score there
    (``scores``: key -> (label, path))."""
    curves = []
    for r in runs:
        if not r.get("snapshots"):
            continue
        points = sorted([*r["snapshots"], r], key=lambda p: p["iterations"])
        curves.append({
            "run": f"{r['arm']} k={r['k']} seed {r['seed']}", "arm": r["arm"], "k": r["k"], "seed": r["seed"],
            "iterations": [p["iterations"] for p in points],
            "scores": {key: [score_at(p, path) for p in points] for key, (_, path) in scores.items()},
        })  # fmt: skip
    return curves


def snapshot_table(curves: list[dict], scores: dict = CURVE_SCORES, what: str = "Test Dice") -> str:
    """``what`` along each run (the snapshots and the final weights; :func:`learning_curves`), one column per
    iteration count and one row per run and score (the score's label in a column of its own when there are
    several): where has a run converged?"""
    its = sorted({i for c in curves for i in c["iterations"]})
    several = len(scores) > 1
    head = ["run", *(["score"] if several else []), *map(str, its)]
    rows = [f"{what} along each run (the same run's weights after that many iterations; the schedule is the "
            "run's full length):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for c in curves:
        for key, (label, _) in scores.items():
            at = dict(zip(c["iterations"], c["scores"][key]))
            cells = [c["run"], *([label] if several else [])]
            cells += [("-" if np.isnan(at[i]) else f"{at[i]:.3f}") if i in at else "" for i in its]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_learning_curves(curves: list[dict], path: Path, scores: dict = CURVE_SCORES) -> None:
    """One panel per score (each between 0 and 1) against the training iterations, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4), squeeze=False)
    for ax, (key, (label, _)) in zip(axes[0], scores.items()):
        for c in curves:
            ax.plot(c["iterations"], c["scores"][key], marker="o", label=c["run"])
        ax.set_xlabel("training iterations")
        ax.set_ylabel(f"{label} (test cases)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: the arm every other arm is compared with in the report: the same network, fine-tuned from random init
BASELINE = "scratch"


def _against_baseline(cell: dict, base: dict | None) -> dict:
    """Mean Dice difference to the baseline cell and Welch's 95 % CI; {} where it cannot be computed."""
    if cell["arm"] == BASELINE or not base or cell["n_seeds"] < 2 or base["n_seeds"] < 2:
        return {}
    w = welch(cell["dice_per_seed"], base["dice_per_seed"])
    return {"dice_vs_baseline": w["difference"], "dice_vs_baseline_ci95": w["ci95"]} if w else {}


def _paired_against_baseline(cell: dict, base: dict | None) -> dict:
    """Seed-paired Dice differences to the baseline (seeds both cells have): mean, sd, paired-t 95 % CI and how
    many seeds were above 0; {} for the baseline itself or without a common seed."""
    if cell["arm"] == BASELINE or not base or not cell["n_seeds"] or not base["n_seeds"]:
        return {}
    p = paired(
        dict(zip(cell["seeds"], cell["dice_per_seed"])), dict(zip(base["seeds"], base["dice_per_seed"]))
    )
    return {"paired": p} if p else {}


def _format_paired(cell: dict) -> str:
    return "(baseline)" if cell["arm"] == BASELINE else format_paired(cell.get("paired"))


def _format_difference(cell: dict) -> str:
    if cell["arm"] == BASELINE:
        return "(baseline)"
    if "dice_vs_baseline" not in cell:
        return ""
    return format_welch({"difference": cell["dice_vs_baseline"], "ci95": cell["dice_vs_baseline_ci95"]})


def _iterations_note(cells: list[dict], s: Settings) -> str:
    """', 50 iterations' for an arm trained for other than the study's iterations (the stock arm), else ''."""
    its = sorted({c["iterations"] for c in cells})
    return "" if its == [s.epochs * s.iters] else ", " + "/".join(map(str, its)) + " iterations"


def parse_args(
    argv: list[str] | None, study: type[Study] = Study, description: str | None = None
) -> tuple[argparse.Namespace, Settings]:
    """The command line of ``study`` (this study, or a subclass's: its settings, work folder and report
    folder)."""
    d, q = study.settings_cls(), study.settings_cls(**study.quick)
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help=f"toy sizes, {len(q.seeds)} seed(s), arms {' '.join(q.arms)}: the same code path in minutes",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help=f"work folder (default work_dirs/{study.work_name}, or its _quick twin with --quick)")  # fmt: skip
    home = study.report_home.relative_to(REPO).as_posix() + "/"
    p.add_argument("--report-dir", type=Path, default=None,
                   help=f"where study.md/.json/.png go (default {home}, or the work folder with --quick)")  # fmt: skip
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                   help=f"arms to run (default: {' '.join(d.arms)})")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"fine-tuning seeds (default {' '.join(map(str, d.seeds))})")  # fmt: skip
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help=f"labeled training cases (default {' '.join(map(str, d.ks))})")  # fmt: skip
    p.add_argument(
        "--corpus", type=int, default=None, help=f"unlabeled phantoms for pre-training (default {d.corpus})"
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="optimizer steps per pre-training run")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (each --iters iterations)")
    p.add_argument("--iters", type=int, default=None, help="fine-tuning iterations per epoch")
    p.add_argument(
        "--stock-epochs",
        type=int,
        default=None,
        help="epochs of the stock nnU-Net arm: equal wall-clock, since equal iterations do not fit (default 2, "
        "about the MiM runs' training time; 0: --epochs, equal iterations)",
    )
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="also score each run's weights every N iterations (a multiple of --iters; default 0: none)")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing results")
    p.add_argument("--stages", nargs="+", default=["data", "pretrain", "plan", "finetune", "report"],
                   choices=["data", "pretrain", "plan", "finetune", "report"], help="stages to run (default all)")  # fmt: skip
    a = p.parse_args(argv)
    s = q if a.quick else d
    for name in ("arms", "seeds", "ks"):
        if getattr(a, name) is not None:
            setattr(s, name, tuple(getattr(a, name)))
    for name in ("corpus", "pretrain_steps", "epochs", "iters", "stock_epochs", "snapshot_every"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    if s.snapshot_every % s.iters:
        p.error(f"--snapshot-every {s.snapshot_every}: not a multiple of --iters {s.iters}")
    work = REPO / "work_dirs" / (f"{study.work_name}_quick" if a.quick else study.work_name)
    a.out = (a.out or work).resolve()
    a.report_dir = (a.report_dir or (a.out if a.quick else study.report_home)).resolve()
    return a, s


def main(
    argv: list[str] | None = None, study_cls: type[Study] = Study, description: str | None = None, parse=parse_args
) -> int:
    """Run the stages of ``study_cls`` (this study by default) that are not done yet, then its report. ``parse``:
    the command line (``parse_args``, or a study's own with the same namespace: stages, report_only, out,
    report_dir)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    a, s = parse(argv, study_cls, description)
    stages = ["report"] if a.report_only else a.stages
    study = study_cls(a.out, s)
    (a.out / f"settings_{a.report_dir.name}.json").write_text(json.dumps(asdict(s), indent=2))  # per report
    t0 = time.perf_counter()
    if "data" in stages:
        study.data()
    if "pretrain" in stages:
        study.pretrain()
    if "plan" in stages:
        study.plan()
    if "finetune" in stages:
        from tqdm import tqdm

        todo = study.all_runs()
        for arm, k, seed in tqdm(todo, desc="fine-tune + predict", unit="run"):
            study.finetune(arm, k, seed)
            if "report" in stages:  # keep the report current while the study runs
                study.build_report(a.report_dir)
    report = study.build_report(a.report_dir)
    log.info("report: %s (%d runs, %d missing) in %.0f s", a.report_dir / "study.md", len(report["runs"]),
             len(report["missing_runs"]), time.perf_counter() - t0)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
