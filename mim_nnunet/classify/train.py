"""``mim_nnunet_classify train``: plan, train, validate, save and resume a classification run.

Owns the training loop and the run's life cycle; the pieces are the project's: the run folder's names and pair
rotation (:mod:`mim_nnunet.pretrain.folder`), the pair loading rules (:func:`mim_nnunet.pretrain.resume.load_pair`:
latest pair, else the previous one), atomic writes, :class:`~mim_nnunet.interrupt.StopRequest` (SIGINT/SIGTERM
finish the step, save, stop), the checkpoint format, DDP set-up (:mod:`mim_nnunet.pretrain.distributed`), the
encoder loading path of segmentation (:func:`mim_nnunet.nnunet.weights.load_pretrained_encoder`) and its optimiser
(AdamW with layer-wise LR decay, per-iteration warm-up + cosine: :mod:`mim_nnunet.nnunet.optim`).

Every epoch: the seeded batches (:mod:`.batches`), cross-entropy (optional class weights), gradient clipping,
bf16/fp16 autocast on CUDA; then validation on the fold's cases (loss, accuracy, AUROC), one line in
``metrics.jsonl``, ``progress.png``, ``checkpoint_best`` when the validation AUROC (accuracy where the AUROC is
undefined) improves, and the checkpoint pair. The pair is also written when a stop is requested mid-epoch; the
resume state records the epoch and the batch, and the seeded order makes the continued run draw the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..atomic import atomic_write_json
from ..checkpoint import CheckpointError, CheckpointMetadata, save_checkpoint, save_resume_state
from ..interrupt import StopRequest
from ..nnunet.optim import WarmupCosineLR, param_groups_layer_decay
from ..nnunet.seeding import seed_everything
from ..nnunet.weights import load_pretrained_encoder
from ..plots import plot_epochs
from ..pretrain.distributed import DistInfo, any_rank, barrier, init_distributed, shutdown
from ..pretrain.engine import AUTOCAST
from ..pretrain.folder import (
    CHECKPOINT_BEST,
    CHECKPOINT_FINAL,
    CHECKPOINT_LATEST,
    CHECKPOINT_PREVIOUS,
    CLASSIFY_RUN_FILES,
    PLAN,
    PREPROCESSED,
    PROGRESS,
    RESUME_STATE,
    SPLITS,
    append_metrics,
    check_run_folder,
    clear_run_folder,
    keep_previous_pair,
    link_or_copy,
    open_metrics,
    read_metrics,
    remove_temporaries,
    reset_metrics,
)
from ..pretrain.resume import ResumeError, load_pair
from ..pretrain.run import resolve_precision, setup_logging
from ..pretrain.sampler import mix_seed
from .batches import TrainingCases, epoch_order, preprocess_cases, validation_input, worker_init
from .dataset import ClassificationDataset, DatasetError, load_dataset, resolve_dataset_folder
from .evaluate import classification_metrics
from .model import MiMClassifier
from .plan import ClassifyPlan, PlanRequest, plan_classification, read_checkpoint_metadata
from .splits import fold_cases

log = logging.getLogger("mim_nnunet.classify")

RESUME_FORMAT = 1
# Options a continued run may change (how it runs, not what it computes); every other one is the run's.
RESUMABLE = {"epochs", "num_workers", "save_every", "precision", "progress", "device"}
DEFAULT_LR = {"finetune": 1e-4, "scratch": 1e-4, "linear_probe": 1e-3}
STOP_MESSAGE = "finishing this batch, saving, then stopping (send it again to abort now)"
PANELS = [("loss (cross-entropy)", ["loss", "val_loss"]), ("validation", ["val_accuracy", "val_auroc"]),
          ("learning rate", ["lr"])]  # fmt: skip


@dataclass
class TrainOptions:
    fold: str = "0"
    epochs: int = 100
    lr: float | None = None  # None: DEFAULT_LR of the mode
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_fraction: float = 0.05
    clip_grad: float = 12.0  # nnU-Net's
    class_weights: str = "none"  # none | balanced | w1,w2,...
    seed: int = 0
    num_workers: int = 2
    save_every: int = 1  # epochs
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True


@dataclass
class ClassifyRun:
    out: Path
    plan: ClassifyPlan
    opts: TrainOptions
    dist: DistInfo
    model: MiMClassifier
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineLR
    scaler: torch.amp.GradScaler
    precision: str
    train_cases: list[str]
    train_labels: list[int]
    val_cases: list[str]
    val_labels: list[int]
    weights: torch.Tensor | None
    epoch: int = 0  # the epoch to continue (0-based)
    batch: int = 0  # batches of it already done
    best: float = -math.inf
    pair_complete: bool = False
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "seen": 0})

    @property
    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.train_cases) / self.dist.world_size)
        return math.ceil(per_rank / self.plan.batch_size)


def class_weights(spec: str, labels: list[int], classes: list[str]) -> torch.Tensor | None:
    if spec == "none":
        return None
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = sorted(set(labels))
        if len(present) < len(classes):
            absent = [classes[k] for k in range(len(classes)) if k not in present]
            raise DatasetError(f"--class-weights balanced: no training case of class {absent[0]!r} in this fold")
        return torch.tensor(compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels)).float()
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if len(values) != len(classes) or min(values, default=-1) <= 0:
        raise DatasetError(f"--class-weights {spec!r}: expected none, balanced or {len(classes)} positive numbers")
    return torch.tensor(values).float()


def build_run(out: Path, plan: ClassifyPlan, opts: TrainOptions, dist: DistInfo, ds_labels: dict,
              split: tuple[list[str], list[str]], load_encoder: bool = True) -> ClassifyRun:  # fmt: skip
    """Network (initialised as the mode says; ``load_encoder=False``: a continued run, whose weights come from
    its own pair), optimiser, schedule and scaler of a run at epoch 0."""
    seed_everything(opts.seed)  # initialisation of the head (and of the whole network from scratch)
    model = plan.build_network()
    if plan.mode != "scratch" and load_encoder:
        report = load_pretrained_encoder(model, plan.checkpoint["path"], plan.checkpoint["sha256"], plan.network)
        log.info("%s", report)
    if plan.mode == "linear_probe":
        model.freeze_encoder()
    model.to(dist.device)
    kw = plan.network
    layer_decay = 1.0 if plan.mode == "linear_probe" else opts.layer_decay
    groups = param_groups_layer_decay(model, opts.weight_decay, layer_decay, kw["conv_depths"], kw["depth"])
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[plan.mode]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    scheduler = WarmupCosineLR(optimizer, lr, opts.epochs, opts.warmup_fraction * opts.epochs)
    precision = resolve_precision(opts.precision, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    train, val = split
    tr_labels, va_labels = [ds_labels[c] for c in train], [ds_labels[c] for c in val]
    weights = class_weights(opts.class_weights, tr_labels, plan.classes)
    return ClassifyRun(out, plan, opts, dist, model, optimizer, scheduler, scaler, precision, train, tr_labels,
                       val, va_labels, weights)  # fmt: skip


# ------------------------------------------------------------------------------------------------ saving


def checkpoint_metadata(run: ClassifyRun, step: int, epoch: int) -> CheckpointMetadata:
    """The MiM metadata of the encoder the run started from, at this run's step (its weights: the classifier's)."""
    c = run.plan.checkpoint
    return CheckpointMetadata(
        preset=c["preset"], config=c["config"], spacing=run.plan.spacing, intensity_window=run.plan.window,
        input_size=c["input_size"], crop_size=c["crop_size"], step=step, epoch=epoch, code_version=__version__,
    )  # fmt: skip


def resume_state(run: ClassifyRun, epoch: int, batch: int, sha: str) -> dict:
    return {
        "format": RESUME_FORMAT, "step": epoch * run.batches_per_epoch + batch, "epoch": epoch, "batch": batch,
        "weights_sha256": sha, "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "best": run.best, "partial": dict(run.partial), "order": order_identity(run),
    }  # fmt: skip


def order_identity(run: ClassifyRun) -> dict:
    """What the batch order depends on: a continued run must have the same."""
    return {"seed": run.opts.seed, "world_size": run.dist.world_size, "batch_size": run.plan.batch_size,
            "train_cases": len(run.train_cases)}  # fmt: skip


def save_pair(run: ClassifyRun, epoch: int, batch: int) -> None:
    """Rank 0: weights, then the resume state naming their sha256, after keeping the whole pair as the previous."""
    if not run.dist.is_main:
        return
    if run.pair_complete:
        keep_previous_pair(run.out)
    run.pair_complete = False
    step = epoch * run.batches_per_epoch + batch
    sha = save_checkpoint(run.out / CHECKPOINT_LATEST, run.model.state_dict(), checkpoint_metadata(run, step, epoch))
    save_resume_state(run.out / RESUME_STATE, resume_state(run, epoch, batch, sha))
    run.pair_complete = True


def restore(run: ClassifyRun) -> None:
    """Continue from the run folder's pair: weights, optimiser, scaler, epoch and batch, best score."""
    found = load_pair(run.out, run.model.state_dict())
    if found is None:
        log.warning("%s: no checkpoint saved yet: starting from epoch 0", run.out)
        return
    state, _, rs, latest = found
    if rs.get("order") != order_identity(run):
        raise ResumeError(f"{run.out / RESUME_STATE}: the batch order depended on {rs.get('order')}, now "
                          f"{order_identity(run)}; start a new run (-o elsewhere) to change them")  # fmt: skip
    run.model.load_state_dict(state)
    run.optimizer.load_state_dict(rs["optimizer"])
    run.scaler.load_state_dict(rs["scaler"])
    run.epoch, run.batch, run.best = int(rs["epoch"]), int(rs["batch"]), float(rs["best"])
    run.partial = dict(rs["partial"])
    run.pair_complete = latest
    log.info("continuing %s at epoch %d, batch %d", run.out, run.epoch, run.batch)


# ------------------------------------------------------------------------------------------------ the loop


def train_epoch(run: ClassifyRun, net: torch.nn.Module, epoch: int, stop: StopRequest, bar: tqdm) -> bool:
    """The remaining batches of ``epoch``; True when a stop was requested (the pair is then saved)."""
    opts, dist, plan = run.opts, run.dist, run.plan
    data = TrainingCases(run.out / PREPROCESSED, run.train_cases, run.train_labels, plan.input_size, opts.seed)
    keys = epoch_order(len(run.train_cases), opts.seed, epoch, dist.rank, dist.world_size)
    keys = keys[run.batch * plan.batch_size:]
    loader = DataLoader(data, batch_size=plan.batch_size, sampler=keys, num_workers=opts.num_workers,
                        worker_init_fn=worker_init if opts.num_workers else None,
                        pin_memory=dist.device.type == "cuda")  # fmt: skip
    weights = run.weights.to(dist.device) if run.weights is not None else None
    dtype = AUTOCAST[run.precision]
    net.train()
    for x, y in loader:
        torch.manual_seed(mix_seed(opts.seed, epoch, run.batch, dist.rank))  # drop-path draws of this batch
        run.scheduler.step(epoch + run.batch / run.batches_per_epoch)
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device)
        with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y, weight=weights)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], opts.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.batch += 1
        value = float(loss.detach())
        run.partial["loss_sum"] += value * len(y)
        run.partial["seen"] += len(y)
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
        if any_rank(stop.requested, dist) and run.batch < run.batches_per_epoch:
            save_pair(run, epoch, run.batch)
            return True
    return False


@torch.no_grad()
def predict_arrays(model: MiMClassifier, inputs: list[torch.Tensor], device: torch.device, precision: str,
                   batch_size: int) -> np.ndarray:  # fmt: skip
    """Softmax probabilities ``(N, K)`` of prepared inputs, in order."""
    model.eval()
    dtype = AUTOCAST[precision]
    out = []
    for i in range(0, len(inputs), batch_size):
        x = torch.stack(inputs[i : i + batch_size]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.head.bias)))


def validate(run: ClassifyRun) -> dict:
    if not run.val_cases:
        return {}
    inputs = [validation_input(run.out / PREPROCESSED, c, run.plan.input_size) for c in run.val_cases]
    probs = predict_arrays(run.model, inputs, run.dist.device, run.precision, run.plan.batch_size)
    y = np.array(run.val_labels)
    m = classification_metrics(y, probs, run.plan.classes)
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_auroc": m["auroc_macro"],
            "val_balanced_accuracy": m["balanced_accuracy"]}  # fmt: skip


def end_epoch(run: ClassifyRun, epoch: int, seconds: float, metrics_file, stopping: bool = False) -> None:
    """Rank 0: the metrics line, the best checkpoint, the pair (every ``save_every`` epochs, at the end and when
    stopping), the plot."""
    record = {"epoch": epoch + 1, "loss": run.partial["loss_sum"] / max(run.partial["seen"], 1),
              "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)} | validate(run)  # fmt: skip
    run.partial = {"loss_sum": 0.0, "seen": 0}
    run.epoch, run.batch = epoch + 1, 0
    if not run.dist.is_main:
        return
    append_metrics(metrics_file, record)
    score = record.get("val_auroc") if record.get("val_auroc") is not None else record.get("val_accuracy")
    if score is not None and score > run.best:
        run.best = score
        save_checkpoint(run.out / CHECKPOINT_BEST, run.model.state_dict(),
                        checkpoint_metadata(run, run.epoch * run.batches_per_epoch, run.epoch))  # fmt: skip
        log.info("epoch %d: new best validation score %.4f -> %s", epoch + 1, score, CHECKPOINT_BEST)
    last = run.epoch >= run.opts.epochs
    if last or stopping or run.epoch % run.opts.save_every == 0:
        save_pair(run, run.epoch, 0)
    if last:
        link_or_copy(run.out / CHECKPOINT_LATEST, run.out / CHECKPOINT_FINAL)
    plot_epochs(read_metrics(run.out, key="epoch"), PANELS, run.out / PROGRESS)
    log.info("epoch %d/%d: %s", epoch + 1, run.opts.epochs,
             " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "seconds"))  # fmt: skip


def train_loop(run: ClassifyRun) -> str:
    """Epochs ``run.epoch .. opts.epochs``; returns ``finished`` or ``interrupted``."""
    net = run.model
    if run.dist.enabled:
        device = run.dist.device
        net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    total = run.opts.epochs * run.batches_per_epoch
    bar = tqdm(total=total, initial=run.epoch * run.batches_per_epoch + run.batch, unit="batch",
               disable=not (run.opts.progress and run.dist.is_main), desc="training", dynamic_ncols=True)  # fmt: skip
    metrics = open_metrics(run.out) if run.dist.is_main else None
    try:
        with StopRequest(message=STOP_MESSAGE) as stop:
            for epoch in range(run.epoch, run.opts.epochs):
                t0 = time.perf_counter()
                if train_epoch(run, net, epoch, stop, bar):
                    return "interrupted"
                stopping = any_rank(stop.requested, run.dist)
                end_epoch(run, epoch, time.perf_counter() - t0, metrics, stopping)
                barrier(run.dist)
                if stopping and run.epoch < run.opts.epochs:
                    return "interrupted"
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return "finished"


# ------------------------------------------------------------------------------------------------ the run


def write_plan(out: Path, plan: ClassifyPlan, opts: TrainOptions, request: PlanRequest, ds: ClassificationDataset,
               split: tuple, split_source: str) -> None:  # fmt: skip
    counts = {name: sum(1 for c in split[0] if ds.labels[c] == k) for k, name in enumerate(ds.classes)}
    atomic_write_json(out / PLAN, {
        "plan": plan.to_dict(), "options": asdict(opts), "request": asdict(request),
        "dataset": {"root": str(ds.root.resolve()), "cases": len(ds.labels), "class_counts": ds.class_counts()},
        "fold": {"fold": opts.fold, "splits": split_source, "train": split[0], "val": split[1],
                 "train_class_counts": counts},
    })  # fmt: skip


def read_run(out: Path) -> dict:
    """``RUN/plan.json`` (plan, options, dataset, fold); :class:`ResumeError` naming the file when unreadable."""
    path = Path(out) / PLAN
    try:
        saved = json.loads(path.read_text())
        ClassifyPlan.from_dict(saved["plan"])
        saved["options"], saved["fold"]  # noqa: B018 -- the parts a continued run needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{path}: not a classification run's plan ({type(e).__name__}: {e})") from None
    return saved


def prepare_folder(out: Path, resume: bool, overwrite: bool) -> None:
    if problem := check_run_folder(out, resume, overwrite, CLASSIFY_RUN_FILES):
        raise ResumeError(problem)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, CLASSIFY_RUN_FILES)
    if overwrite and (gone := clear_run_folder(out, files=(*CLASSIFY_RUN_FILES, SPLITS))):
        log.warning("--overwrite: removed %s from %s", ", ".join(gone), out)  # preprocessed/ is checked on use


def run_training(out: Path, plan: ClassifyPlan, opts: TrainOptions, ds: ClassificationDataset,
                 split: tuple[list[str], list[str]], dist: DistInfo, resume: bool) -> str:  # fmt: skip
    """Preprocess the fold's cases (rank 0), build or restore the run, train; ``finished`` or ``interrupted``."""
    if dist.is_main:
        preprocess_cases(ds.images, split[0] + split[1], out / PREPROCESSED, plan, opts.progress)
    barrier(dist)
    saved = resume and any((out / name).is_file() for name in (CHECKPOINT_LATEST, CHECKPOINT_PREVIOUS))
    try:
        run = build_run(out, plan, opts, dist, ds.labels, split, load_encoder=not saved)
    except CheckpointError as e:
        raise DatasetError(str(e)) from None
    if resume:
        restore(run)
    if dist.is_main:
        reset_metrics(out, run.epoch if resume else None, key="epoch")
    if run.epoch >= opts.epochs:
        if dist.is_main and not (out / CHECKPOINT_FINAL).is_file():
            link_or_copy(out / CHECKPOINT_LATEST, out / CHECKPOINT_FINAL)
        log.info("%s: all %d epochs are done", out, opts.epochs)
        return "finished"
    how = train_loop(run)
    if how == "interrupted":
        log.info("stopped at epoch %d, batch %d; continue with: mim_nnunet_classify train -o %s --resume",
                 run.epoch, run.batch, out)  # fmt: skip
    else:
        log.info("finished: %s", out / CHECKPOINT_FINAL)
    return how


def resumed(out: Path, dataset, opts: TrainOptions, request: PlanRequest, given: set[str]):
    """Plan, options, dataset and split of the run in ``out``. Options of :data:`RESUMABLE` given again take
    effect; any other option or planning request given again must equal the stored one (a requeued job repeats
    its whole command line), else :class:`ResumeError` names both."""
    saved = read_run(out)
    stored_opts, stored_req = saved["options"], saved.get("request", {})
    clash = {k: (stored_opts[k], getattr(opts, k)) for k in sorted(given & set(stored_opts) - RESUMABLE)
             if json.dumps(stored_opts[k]) != json.dumps(getattr(opts, k))}  # fmt: skip
    clash |= {k: (stored_req[k], getattr(request, k)) for k in sorted(given & set(stored_req))
              if json.dumps(stored_req[k]) != json.dumps(getattr(request, k))}  # fmt: skip
    root = saved["dataset"]["root"]
    if dataset is not None and "dataset" in given:
        now = str(resolve_dataset_folder(dataset).resolve())
        if now != root:
            clash["input"] = (root, now)
    if clash:
        detail = "; ".join(f"{k}: run {a!r}, given {b!r}" for k, (a, b) in clash.items())
        raise ResumeError(f"{out / PLAN}: {', '.join(clash)} cannot change in a continued run ({detail}); "
                          "start a new run in another folder instead")  # fmt: skip
    merged = TrainOptions(**(stored_opts | {k: getattr(opts, k) for k in given & RESUMABLE}))
    ds = load_dataset(root)
    return ClassifyPlan.from_dict(saved["plan"]), merged, ds, (saved["fold"]["train"], saved["fold"]["val"])


def train(dataset, checkpoint, out, request: PlanRequest, opts: TrainOptions, resume: bool = False,
          overwrite: bool = False, given: set[str] | frozenset = frozenset()) -> str:  # fmt: skip
    """``mim_nnunet_classify train`` as a library call: ``finished`` or ``interrupted``. ``given``: the option
    names given on the command line (what a continued run compares). ``resume`` on a folder without a plan yet
    starts the run (a requeued job killed before it began repeats its command line)."""
    out = Path(out)
    dist = init_distributed(opts.device)
    try:
        if resume and (out / PLAN).is_file():
            plan, opts, ds, split = resumed(out, dataset, opts, request, set(given))
            setup_logging(out, dist.is_main)
        else:
            if dataset is None or checkpoint is None:
                raise ResumeError(f"{out / PLAN} not found: {out} holds no classification run to continue, and "
                                  "without -i and -pt there is none to start")  # fmt: skip
            # Every check before anything is written: the checkpoint, the dataset, the folds, the plan.
            read_checkpoint_metadata(checkpoint)
            ds = load_dataset(dataset)
            train_cases, val_cases, source = fold_cases(ds, opts.fold, out, write=False, reuse=not overwrite)
            plan = plan_classification(ds, checkpoint, request, len(train_cases))
            split = (train_cases, val_cases)
            if dist.is_main:
                prepare_folder(out, resume, overwrite)
                fold_cases(ds, opts.fold, out)  # writes the run's splits_final.json when it made them
                write_plan(out, plan, opts, request, ds, split, source)
            barrier(dist)
            setup_logging(out, dist.is_main)
            resume = False  # nothing to continue: the run starts here
            log.info("plan: %s", "; ".join(f"{k}: {v}" for k, v in plan.reasons.items()))
        return run_training(out, plan, opts, ds, split, dist, resume)
    finally:
        shutdown(dist)
