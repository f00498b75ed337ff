"""The run folder of a pre-training or classification run: its file names, which files make a run, the
checkpoint pair rotation, and reading and writing ``config.json`` and ``metrics.jsonl``. Nothing else names a run
folder's files.

Layout::

    config.json                    options, model config, data settings, derived values (lr, steps, precision)
    checkpoint_latest.safetensors  weights + metadata (mim_nnunet.checkpoint), every --save-every steps
    checkpoint_final.safetensors   the same at the end of the schedule: the file fine-tuning uses
    resume_state.pt                optimizer, scaler, schedule, data position and seeds of checkpoint_latest
    checkpoint_previous.safetensors + resume_state_previous.pt   the pair before (hard links where possible)
    train.log, metrics.jsonl       the log; one JSON line of losses, lr and throughput per optimizer step
    progress.png                   losses and lr over steps
    previews/step_XXXXX_level{1,2,3}.png  reconstruction of a fixed crop at every checkpoint

A classification run (:mod:`mim_nnunet.classify`) uses the same checkpoint pair, resume state, metrics and
progress names, plus ``plan.json`` (every planning decision and the options), ``splits_final.json`` (the folds)
and ``checkpoint_best.safetensors`` (best validation AUROC): :data:`CLASSIFY_RUN_FILES`.

What may change when a run continues is :mod:`.resume`'s business; this module only knows the files.
docs/pretraining.md, "Run folder and resume rules", explains both for users.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO

log = logging.getLogger("mim_nnunet.pretrain")

CHECKPOINT_LATEST = "checkpoint_latest.safetensors"
CHECKPOINT_FINAL = "checkpoint_final.safetensors"
RESUME_STATE = "resume_state.pt"
CHECKPOINT_PREVIOUS = "checkpoint_previous.safetensors"
RESUME_STATE_PREVIOUS = "resume_state_previous.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
PROGRESS = "progress.png"
PREVIEWS = "previews"
DEFAULT_CACHE = "cache"  # the cache folder inside the run folder when --cache is not given
# Files that make a folder a run (a preprocess-only invocation leaves train.log and cache/, which do not count).
RUN_FILES = (CONFIG, CHECKPOINT_LATEST, CHECKPOINT_FINAL, RESUME_STATE, CHECKPOINT_PREVIOUS, RESUME_STATE_PREVIOUS,
             METRICS)  # fmt: skip
PLAN = "plan.json"
SPLITS = "splits_final.json"
CHECKPOINT_BEST = "checkpoint_best.safetensors"
PREPROCESSED = "preprocessed"  # a classification run's resampled, windowed training cases
CLASSIFY_RUN_FILES = (PLAN, CHECKPOINT_LATEST, CHECKPOINT_FINAL, CHECKPOINT_BEST, RESUME_STATE, CHECKPOINT_PREVIOUS,
                      RESUME_STATE_PREVIOUS, METRICS)  # fmt: skip
# (weights, resume state) pairs in the order resume tries them
PAIRS = ((CHECKPOINT_LATEST, RESUME_STATE), (CHECKPOINT_PREVIOUS, RESUME_STATE_PREVIOUS))


class RunFolderError(ValueError):
    """A new run pointed at a folder that already holds one."""


def check_run_folder(
    out: str | Path, resume: bool, overwrite: bool, files: tuple[str, ...] = RUN_FILES
) -> str | None:
    """Why a run may not start in ``out`` (one line), or None. A new run needs a folder without a run in it
    (``files``: the names that make one)."""
    out = Path(out)
    if resume and overwrite:
        return "--resume and --overwrite exclude each other"
    found = [n for n in files if (out / n).exists()]
    if found and not (resume or overwrite):
        return (
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, replace it with "
            "--overwrite, or give another -o"
        )
    return None


def has_run(out: str | Path) -> bool:
    """Whether ``out`` holds a run that can be resumed (its config.json was written)."""
    return (Path(out) / CONFIG).is_file()


def clear_run_folder(out: str | Path, logs: bool = False, files: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Remove a run's files from ``out`` (``--overwrite``); the cache, if inside, stays. Returns what went."""
    out = Path(out)
    gone = []
    for name in (*files, PROGRESS, *((LOG,) if logs else ())):
        if (out / name).exists():
            (out / name).unlink()
            gone.append(name)
    if (out / PREVIEWS).is_dir():
        shutil.rmtree(out / PREVIEWS)
        gone.append(PREVIEWS)
    return gone


def remove_temporaries(out: str | Path, files: tuple[str, ...] = RUN_FILES) -> None:
    """Temporaries of writes cut short by SIGKILL (:mod:`mim_nnunet.atomic`; the files they were to replace are
    intact)."""
    for name in (*files, PROGRESS):
        for tmp in Path(out).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link (instant) or, where links fail, a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def keep_previous_pair(out: Path) -> None:
    """Before a new pair is written, the complete one on disk becomes the ``previous`` pair (resume state first:
    a kill in between leaves the latest pair whole, and a previous pair that resume detects as mismatched)."""
    link_or_copy(out / RESUME_STATE, out / RESUME_STATE_PREVIOUS)
    link_or_copy(out / CHECKPOINT_LATEST, out / CHECKPOINT_PREVIOUS)


# config.json's "options" keep the command line's names; inside the code the model's execution is named as the
# model names it (RunOptions.packed = MiMConfig.packed), which config.json and the flag call dense_execution.
def options_to_config(options: dict) -> dict:
    """``asdict(RunOptions)`` as config.json stores it (same key order)."""
    return {("dense_execution" if k == "packed" else k): (not v if k == "packed" else v) for k, v in options.items()}


def options_from_config(stored: dict) -> dict:
    """config.json's ``options`` under the code's names: :func:`options_to_config` undone."""
    return {("packed" if k == "dense_execution" else k): (not v if k == "dense_execution" else v)
            for k, v in stored.items()}  # fmt: skip


def write_config(out: Path, info: dict) -> None:
    (out / CONFIG).write_text(json.dumps(info, indent=2) + "\n")


def read_config(out: str | Path) -> dict:
    """``config.json`` of a run; ``ValueError`` naming the file when it is missing, unreadable or incomplete."""
    path = Path(out) / CONFIG
    try:
        saved = json.loads(path.read_text())
        saved["options"], saved["data"]  # noqa: B018 -- the two parts every reader needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not readable ({e})") from None
    return saved


def read_metrics(out_dir: Path, up_to_step: int | None = None, key: str = "step") -> list[dict]:
    """The records of ``metrics.jsonl``; a line that is not a whole record (a kill mid-write) is skipped with a
    warning. ``key``: the record's counter (``step`` in pre-training, ``epoch`` in classification)."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record[key])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: line %d is not a complete record (%.60r), skipped", path, n, line)
            continue
        records.append(record)
    return [r for r in records if up_to_step is None or r[key] <= up_to_step]


def reset_metrics(out: Path, keep_up_to: int | None, key: str = "step") -> None:
    """``metrics.jsonl`` with the records up to step ``keep_up_to`` only (None: empty, a new run); the steps after
    the checkpoint a run continues from are trained again and logged again."""
    records = read_metrics(out, keep_up_to, key) if keep_up_to is not None else []
    (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))


def open_metrics(out: Path) -> IO[str]:
    return open(out / METRICS, "a")  # noqa: SIM115 -- the caller closes it


def append_metrics(f: IO[str], record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
