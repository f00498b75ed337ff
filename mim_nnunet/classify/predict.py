"""``mim_nnunet_classify predict``: class probabilities of every case in a folder, from one or more runs.

Owns inference: a run is rebuilt from its ``plan.json`` and one of its checkpoints (``final`` by default; the
pre-training checkpoint is not needed), each case goes through the run's own input pipeline (:mod:`.images`: the
run's spacing, window, input size), and the softmax probabilities of several runs (``-m`` repeated, e.g. the five
folds) are averaged. All runs must have the same classes in the same order. The table is written atomically:
``case, class, p_<class> ...`` (the class of the highest mean probability; the probabilities of a row sum to 1).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..checkpoint import CheckpointError, check_state_dict, load_checkpoint
from ..pretrain.distributed import resolve_device
from ..pretrain.folder import CHECKPOINT_BEST, CHECKPOINT_FINAL, CHECKPOINT_LATEST, PLAN
from ..pretrain.resume import ResumeError
from ..pretrain.run import resolve_precision
from .dataset import DatasetError
from .evaluate import PROB_PREFIX
from .images import fit_to_input, load_case
from .model import MiMClassifier
from .plan import ClassifyPlan
from .train import predict_arrays, read_run

log = logging.getLogger("mim_nnunet.classify")

CHECKPOINTS = {"final": CHECKPOINT_FINAL, "best": CHECKPOINT_BEST, "latest": CHECKPOINT_LATEST}


def load_run(run: str | os.PathLike, which: str = "final") -> tuple[ClassifyPlan, MiMClassifier]:
    """The plan and the trained network of a run folder (its ``which`` checkpoint), in eval mode."""
    run = Path(run)
    if not (run / PLAN).is_file():
        raise DatasetError(f"{run}: not a classification run (no {PLAN})")
    try:
        plan = ClassifyPlan.from_dict(read_run(run)["plan"])
    except ResumeError as e:
        raise DatasetError(str(e)) from None
    path = run / CHECKPOINTS[which]
    if not path.is_file():
        present = [k for k, name in CHECKPOINTS.items() if (run / name).is_file()]
        hint = f"; it has {', '.join(present)} (--checkpoint)" if present else "; it has no checkpoint yet"
        raise DatasetError(f"{path}: no {which} checkpoint in run {run}{hint}")
    model = plan.build_network()
    try:
        state, _ = load_checkpoint(path)
        check_state_dict(path, state, model.state_dict())
    except CheckpointError as e:
        raise DatasetError(str(e)) from None
    model.load_state_dict(state)
    return plan, model.eval()


def list_cases(folder: str | os.PathLike, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """case -> channel files of a folder: ``CASE_0000<ending>`` ... (nnU-Net's layout) or, for one channel, any
    ``CASE<ending>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder of images")
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.glob(f"*{file_ending}")):
        stem = p.name[: -len(file_ending)]
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        if m and m.group(2) == "0000":
            case = m.group(1)
            out[case] = [folder / f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        elif not m and num_channels == 1:
            out[stem] = [p]
    for case, files in out.items():
        if absent := [f.name for f in files if not f.is_file()]:
            raise DatasetError(f"{folder}: case {case} lacks the channel file(s) {absent}")
    if not out:
        raise DatasetError(f"{folder}: no image ending in {file_ending!r} (CASE_0000{file_ending})")
    return out


def predict(runs: list[str | os.PathLike], images: str | os.PathLike, out: str | os.PathLike,
            device: str = "auto", which: str = "final", progress: bool = True) -> list[dict]:  # fmt: skip
    """Write ``out`` (predictions.csv) for every case of ``images``; returns its rows."""
    loaded = [load_run(r, which) for r in runs]
    classes = loaded[0][0].classes
    for r, (plan, _) in zip(runs[1:], loaded[1:]):
        if plan.classes != classes:
            raise DatasetError(f"{Path(r) / PLAN}: classes {plan.classes} differ from {runs[0]}'s {classes}")
    first = loaded[0][0]
    cases = list_cases(images, first.file_ending, len(first.channel_names))
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    for _, model in loaded:
        model.to(dev)
    rows = []
    for case, files in tqdm(cases.items(), desc="predicting", unit="case", disable=not progress):
        probs = np.zeros(len(classes))
        for plan, model in loaded:
            x = torch.from_numpy(fit_to_input(load_case(files, plan.spacing, plan.window, plan.normalization),
                                              plan.input_size))  # fmt: skip
            probs += predict_arrays(model, [x], dev, precision, 1)[0].astype(np.float64)
        probs /= len(loaded)
        rows.append({"case": case, "class": classes[int(probs.argmax())]}
                    | {PROB_PREFIX + c: float(p) for c, p in zip(classes, probs)})  # fmt: skip
    write_table(out, rows, classes)
    log.info("%d cases -> %s", len(rows), out)
    return rows


def write_table(path: str | os.PathLike, rows: list[dict], classes: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["case", "class", *(PROB_PREFIX + c for c in classes)], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.8f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
