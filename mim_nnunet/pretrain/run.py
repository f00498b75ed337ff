"""A pre-training run: :func:`run_pretraining` builds the model (:func:`build_run`), restores a checkpoint
(:func:`restore_run`), and drives :func:`.engine.train_steps`, saving (:func:`save`) and reporting
(:class:`StepReport`) as it goes. Each of those steps is a module-level function of one :class:`Run`, so each is
tested on its own.

The run folder's files are :mod:`.folder`'s, what may change on resume :mod:`.resume`'s. Only rank 0 writes; every
rank reaches every collective (barriers included). The weights are written before the resume state, and the
resume state records the sha256 of the weights it belongs to, so a kill between the two writes is detected on
resume instead of silently continuing from a mismatched optimizer state. Before a new pair is written, the
complete one on disk is kept as the ``previous`` pair; resume falls back to it (with a warning) when the latest
pair is incomplete, so a kill at any point of a save leaves a way on.

A new run refuses a folder that already holds a run (:func:`.folder.check_run_folder`) unless asked to overwrite it.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import __version__, build_pretraining_model
from ..checkpoint import CheckpointError, CheckpointMetadata, save_checkpoint, save_resume_state
from ..interrupt import StopRequest
from ..model.config import TOKEN_SIZE
from ..plots import plot_progress, save_previews
from .distributed import DistInfo, any_rank
from .engine import AUTOCAST, train_steps
from .folder import (  # noqa: F401 -- names callers imported from here before the folder had its module
    CHECKPOINT_FINAL,
    CHECKPOINT_LATEST,
    CHECKPOINT_PREVIOUS,
    CONFIG,
    LOG,
    METRICS,
    PREVIEWS,
    PROGRESS,
    RESUME_STATE,
    RESUME_STATE_PREVIOUS,
    RUN_FILES,
    RunFolderError,
    append_metrics,
    check_run_folder,
    clear_run_folder,
    keep_previous_pair,
    open_metrics,
    options_to_config,
    read_metrics,
    remove_temporaries,
    reset_metrics,
    write_config,
)
from .optim import build_optimizer, lr_at, scaled_lr
from .resume import RESUME_FORMAT, ResumeError, data_position, restore
from .sampler import CropOrder, EpochCrops, ignore_stop_signals

log = logging.getLogger("mim_nnunet.pretrain")

# Measured with benchmarks/bench_precision.py on the project's 2-core AVX-512 CPU: bf16 autocast took 1.99x the
# fp32 step time for `small` and 7.6x for `tiny` (docs/pretraining.md); mim_method.md §8 found it slower for
# `base` too. So `auto` means fp32 on CPU.
CPU_AUTO_PRECISION = "fp32"
WARMUP_FRACTION = 0.05  # the paper warms up 40 of 800 epochs (mim_method.md §5)


@dataclass
class RunOptions:
    """Everything that decides a run besides the data. Defaults follow mim_method.md §5 where it says."""

    preset: str = "base"
    levels: int | None = None  # None: the preset's (3); 1 = plain hybrid MAE, the ablation baseline
    grad_checkpointing: bool = False
    # the model's execution (MiMConfig.packed): visible voxels only; False computes the masked voxels too (same
    # maths, the reference). The command line and config.json call it the other way round: --dense-execution.
    packed: bool = True
    align_target: str = "online"  # "ema": BYOL-style EMA target for the alignment heads (pretrain/monitor.py)
    align_ema: float = 0.99
    batch_size: int = 2  # crops per micro-batch per process
    accumulate: int = 1
    max_steps: int | None = None  # optimizer steps; wins over epochs
    epochs: int | None = 800
    lr: float | None = None  # absolute; None: blr * effective_batch / 256
    blr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: 5 % of the schedule
    clip_grad: float | None = None
    precision: str = "auto"
    seed: int = 0
    num_workers: int = 2
    save_every: int = 500
    log_every: int = 10
    stop_after: int | None = None  # leave after this many steps of this invocation (resume later)
    progress: bool = True
    probe: str | None = None  # labeled nnU-Net raw dataset for the linear probe (pretrain/probe.py)
    probe_every: int = 500
    probe_cases: int = 4

    def model_overrides(self) -> dict:
        o = {"grad_checkpointing": self.grad_checkpointing} if self.grad_checkpointing else {}
        o |= {} if self.packed else {"packed": False}
        o |= {"align_target": self.align_target, "align_ema": self.align_ema} if self.align_target != "online" else {}
        return o | ({"levels": self.levels} if self.levels is not None else {})


@dataclass
class Schedule:
    effective_batch: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    min_lr: float

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps, self.total_steps, self.min_lr)


@dataclass
class RunResult:
    status: (
        str  # "finished" (schedule done), "stopped" (stop_after reached) or "interrupted" (SIGINT/SIGTERM)
    )
    step: int  # optimizer steps done in all
    model: torch.nn.Module  # the trained MiMPretrainingModel (not the DDP wrapper)
    signal: int | None = None  # the signal that interrupted it (this rank's; None on the others)


def plan_schedule(opts: RunOptions, steps_per_epoch: int, world_size: int) -> Schedule:
    eff = opts.batch_size * opts.accumulate * world_size
    lr = opts.lr if opts.lr is not None else scaled_lr(opts.blr, eff)
    if opts.max_steps is not None:
        total = opts.max_steps
    elif opts.epochs is not None:
        total = opts.epochs * steps_per_epoch
    else:
        raise ValueError("give the length of the schedule: max_steps or epochs")
    if total < 1:
        raise ValueError(f"the schedule must have at least one step, got {total}")
    warmup = opts.warmup_steps if opts.warmup_steps is not None else round(WARMUP_FRACTION * total)
    return Schedule(eff, lr, steps_per_epoch, total, min(warmup, total), opts.min_lr)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return CPU_AUTO_PRECISION
    if precision not in AUTOCAST:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


class TqdmHandler(logging.Handler):
    """Log records through ``tqdm.write``: a line printed while a bar runs does not break the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(out_dir: str | Path, is_main: bool = True) -> None:
    """Console (through tqdm, so the bar survives) and, on rank 0, ``train.log`` in the run folder."""
    root = logging.getLogger("mim_nnunet")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_mim_run", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [TqdmHandler()]
    if is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / LOG))
    for h in handlers:
        h._mim_run = True
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(h)


STOP_MESSAGE = "finishing this step, saving, then stopping (send it again to abort now)"


def _on_every_rank(dist: DistInfo, fn: Callable, *args):
    """``fn(*args)`` on each rank; an exception on any rank is raised on all of them (no rank is left waiting in a
    collective for one that died)."""
    error: BaseException | None = None
    try:
        result = fn(*args)
    except (CheckpointError, ValueError, OSError) as e:
        error = e
    if any_rank(error is not None, dist):
        if error is not None:
            raise error
        raise ResumeError("another rank failed to set up the run (its log says why)")
    return result


@dataclass
class Run:
    """The parts of one run that its steps share: made by :func:`build_run`, moved on by :func:`restore_run`
    (``start``) and :func:`save` (``pair_complete``)."""

    out: Path
    opts: RunOptions
    data: dict
    dist: DistInfo
    model: torch.nn.Module  # the MiMPretrainingModel (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    order: CropOrder
    sched: Schedule
    precision: str
    preview_crop: torch.Tensor | None = None  # rank 0: the fixed crop of the reconstruction previews
    probe: Callable | None = field(default=None, repr=False)  # rank 0, with opts.probe: the linear probe
    start: int = 0  # the step this invocation continues from
    pair_complete: bool = False  # the latest pair on disk is whole (it may become the fallback)

    @property
    def end(self) -> int:
        """The step this invocation stops at: the schedule's end, or earlier with ``stop_after``."""
        total = self.sched.total_steps
        return total if self.opts.stop_after is None else min(total, self.start + self.opts.stop_after)


def prepare_folder(out: Path, resume: bool, overwrite: bool, dist: DistInfo) -> None:
    """Rank 0: refuse a folder that holds a run (:class:`RunFolderError`) unless ``resume`` or ``overwrite``,
    remove the temporaries of writes cut short, and with ``overwrite`` the old run's files."""
    if not dist.is_main:
        return
    if problem := check_run_folder(out, resume, overwrite):
        raise RunFolderError(problem)
    remove_temporaries(out)
    if overwrite and (gone := clear_run_folder(out)):
        log.warning("--overwrite: removed %s from %s", ", ".join(gone), out)


def build_run(out: Path, opts: RunOptions, crops: Dataset, data: dict, dist: DistInfo) -> Run:
    """Model, optimizer, loss scaler, crop order and schedule of a run from step 0; on rank 0 also the preview
    crop and the probe."""
    precision = resolve_precision(opts.precision, dist.device)
    torch.manual_seed(opts.seed)  # the initial weights (DDP also broadcasts rank 0's)
    model = build_pretraining_model(opts.preset, **opts.model_overrides()).to(dist.device)
    order = CropOrder(len(crops), opts.batch_size, opts.accumulate, dist.world_size, dist.rank, opts.seed)
    sched = plan_schedule(opts, order.steps_per_epoch, dist.world_size)
    optimizer = build_optimizer(model, sched.lr, opts.weight_decay)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    run = Run(out, opts, data, dist, model, optimizer, scaler, order, sched, precision)
    if dist.is_main:
        run.preview_crop = EpochCrops(crops)[0, 0][None]
    if opts.probe and dist.is_main:
        from .probe import LinearProbe

        run.probe = LinearProbe.from_dataset(opts.probe, opts.probe_cases, model.crop_size, data["spacing"],
                                             data["window"], opts.seed)  # fmt: skip
    return run


def restore_run(run: Run) -> None:
    """Continue from the run folder's checkpoint (:func:`.resume.restore`, on every rank: a failure on one is
    raised on all)."""
    run.start, run.pair_complete = _on_every_rank(
        run.dist, restore, run.out, run.model, run.optimizer, run.scaler, run.order, run.opts, run.dist, run.data
    )
    run.order.start_step = run.start


def run_config(run: Run) -> dict:
    """What ``config.json`` records: options, model config, data settings (the fingerprint aside: it is in the
    checkpoint), derived values."""
    derived = asdict(run.sched) | {"precision": run.precision, "world_size": run.dist.world_size,
                                   "device": str(run.dist.device)}  # fmt: skip
    return {
        "options": options_to_config(asdict(run.opts)),
        "model": run.model.config.to_dict(),
        "data": {k: v for k, v in run.data.items() if k != "corpus"},
        "derived": derived,
        "code_version": __version__,
    }


def report_start(run: Run, num_volumes: int, resume: bool) -> None:
    """Rank 0: ``metrics.jsonl`` cut back to the checkpoint, ``config.json``, and one line saying what runs."""
    if not run.dist.is_main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    reset_metrics(run.out, run.start if resume else None)
    write_config(run.out, run_config(run))
    opts, sched = run.opts, run.sched
    log.info(
        "%s%s: preset %s, %d volumes, %d crops per step (%d x %d accumulated x %d processes), lr %.3g, "
        "%d steps (%d per epoch, warm-up %d), precision %s on %s",
        "resuming " if resume else "", run.out, opts.preset, num_volumes, sched.effective_batch, opts.batch_size,
        opts.accumulate, run.dist.world_size, sched.lr, sched.total_steps, sched.steps_per_epoch,
        sched.warmup_steps, run.precision, run.dist.device,
    )  # fmt: skip


def checkpoint_metadata(run: Run, step: int) -> CheckpointMetadata:
    model = run.model
    return CheckpointMetadata(
        preset=run.opts.preset, config=model.config.to_dict(), spacing=[float(s) for s in run.data["spacing"]],
        intensity_window=[float(w) for w in run.data["window"]], token_size=TOKEN_SIZE,
        input_size=model.input_size, crop_size=model.crop_size, corpus=run.data.get("corpus", {}), step=step,
        epoch=step // run.sched.steps_per_epoch, code_version=__version__,
    )  # fmt: skip


def resume_state(run: Run, step: int, weights_sha256: str) -> dict:
    """``resume_state.pt``: everything besides the weights that continuing exactly needs, tied to its weights."""
    return {
        "format": RESUME_FORMAT, "step": step, "weights_sha256": weights_sha256,
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "schedule": asdict(run.sched),
        "data": data_position(run.order, run.opts, run.dist, step),
        "rng": {"seed": run.opts.seed, "scheme": "masks: Generator(mix(seed, rank, step, micro)); "
                "global RNG re-seeded with mix(seed, rank, step) each step; crops: (seed, epoch, index)"},
    }  # fmt: skip


def write_checkpoint(run: Run, step: int, final: bool) -> None:
    """Rank 0: the checkpoint pair of ``step`` (weights first, then the resume state naming their sha256), after
    keeping the whole pair on disk as the previous one; with ``final`` also ``checkpoint_final``."""
    if run.pair_complete:  # keep the whole pair on disk until the new one is whole too
        keep_previous_pair(run.out)
    run.pair_complete = False
    sha = save_checkpoint(run.out / CHECKPOINT_LATEST, run.model.state_dict(), checkpoint_metadata(run, step))
    save_resume_state(run.out / RESUME_STATE, resume_state(run, step, sha))
    run.pair_complete = True
    if final:
        save_checkpoint(run.out / CHECKPOINT_FINAL, run.model.state_dict(), checkpoint_metadata(run, step))


def write_pictures(run: Run, step: int) -> None:
    """Rank 0: the reconstruction previews of the fixed crop (fixed masks, so they compare) and ``progress.png``."""
    model, device = run.model, run.dist.device
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, AUTOCAST[run.precision], enabled=run.precision != "fp32"):
        preview = model(run.preview_crop.to(device), generator=torch.Generator().manual_seed(run.opts.seed))
    model.train()
    save_previews(preview, run.out / PREVIEWS, step, model.config.norm_pix_loss)
    plot_progress(read_metrics(run.out), run.out / PROGRESS)


def save(run: Run, step: int, final: bool = False) -> None:
    """Called on every rank; rank 0 writes. It ends in a collective, which also carries a failure of rank 0's
    writes (disk full, permissions) to every rank instead of leaving them waiting."""
    error: Exception | None = None
    try:
        if run.dist.is_main:
            write_checkpoint(run, step, final)
            write_pictures(run, step)
            log.info("step %d: saved %s%s", step, run.out / CHECKPOINT_LATEST, " and " + CHECKPOINT_FINAL if final else "")
    except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
        error = e
    if any_rank(error is not None, run.dist):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed to save step {step} (its log says why)")


class StepReport:
    """``on_step`` of :func:`.engine.train_steps`: the probe when due, then on rank 0 a line of ``metrics.jsonl``,
    the bar and the log; then, on every rank, whether to save and whether to stop. A context manager: the bar and
    ``metrics.jsonl`` are open while the loop runs."""

    def __init__(self, run: Run, stop: StopRequest) -> None:
        self.run, self.stop = run, stop
        self.t_start = time.perf_counter()
        self.bar = tqdm(total=run.sched.total_steps, initial=run.start, unit="step", dynamic_ncols=True,
                        disable=not (run.dist.is_main and run.opts.progress), desc="pre-training")  # fmt: skip
        self.metrics = open_metrics(run.out) if run.dist.is_main else None

    def __enter__(self) -> StepReport:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()

    def probe_due(self, step: int) -> bool:
        run = self.run
        return run.probe is not None and (step == run.start + 1 or step % run.opts.probe_every == 0 or step == run.end)

    def __call__(self, step: int, m: dict) -> bool:
        run = self.run
        if self.probe_due(step):
            m = m | run.probe(run.model.encoder, run.dist.device, AUTOCAST[run.precision])
        if run.dist.is_main:
            self.record(step, m)
        stopping = any_rank(self.stop.requested, run.dist)
        if stopping or step % run.opts.save_every == 0 or step == run.end:
            save(run, step, final=step == run.sched.total_steps)
        return stopping

    def record(self, step: int, m: dict) -> None:
        run, sched = self.run, self.run.sched
        append_metrics(self.metrics, {"step": step, "epoch": step / sched.steps_per_epoch} | m)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", crops_s=f"{m['crops_per_s']:.2f}")
        if step % run.opts.log_every == 0 or step == run.end:
            eta = (time.perf_counter() - self.t_start) / (step - run.start) * (sched.total_steps - step)
            log.info(
                "step %d/%d epoch %.2f | %s | lr %.3g | %.2f crops/s | ETA %s",
                step, sched.total_steps, step / sched.steps_per_epoch,
                " ".join(f"{k} {m[k]:.4f}" for k in m if k[:3] in ("los", "rec", "ali")),
                m["lr"], m["crops_per_s"], tqdm.format_interval(eta),
            )  # fmt: skip


def complete_schedule(run: Run) -> RunResult:
    """A resumed run whose schedule is already done: only ``checkpoint_final`` is written, if missing."""
    # rank 0 decides, every rank saves: save() ends in a barrier every rank must reach
    if any_rank(run.dist.is_main and not (run.out / CHECKPOINT_FINAL).is_file(), run.dist):
        save(run, run.start, final=True)
    log.info("the schedule (%d steps) is already complete", run.sched.total_steps)
    return RunResult("finished", run.start, run.model)


def data_parallel(run: Run) -> torch.nn.Module:
    """The module the loop trains: the model, wrapped in DDP when there are several processes."""
    if not run.dist.enabled:
        return run.model
    # The 1x1x1 conv weights' gradients come out channels-last, so DDP copies them into its buckets: harmless (a
    # few small tensors), but it warns on every rank at the first step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device = run.dist.device
    return DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)


def train(run: Run, crops: Dataset) -> RunResult:
    """Steps ``run.start .. run.end`` with SIGINT/SIGTERM turned into "save, then stop"."""
    opts, dist = run.opts, run.dist
    net = data_parallel(run)
    loader = DataLoader(EpochCrops(crops), batch_size=opts.batch_size, sampler=run.order,
                        num_workers=opts.num_workers, pin_memory=dist.device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if opts.num_workers else None)  # fmt: skip
    with StopRequest(message=STOP_MESSAGE) as stop, StepReport(run, stop) as report:
        done = train_steps(net, iter(loader), run.optimizer, run.scaler, run.sched.lr_at, run.start, run.end,
                           opts.accumulate, opts.seed, dist, run.precision, opts.clip_grad, report)  # fmt: skip
    if done >= run.sched.total_steps:
        log.info("finished: %s", run.out / CHECKPOINT_FINAL)
        return RunResult("finished", done, run.model)
    how = "interrupted" if stop.requested else "stopped"
    log.info("%s at step %d of %d; continue with: mim_nnunet_pretrain -o %s --resume", how, done,
             run.sched.total_steps, run.out)  # fmt: skip
    return RunResult(how, done, run.model, stop.signum)


def run_pretraining(
    out_dir: str | Path,
    opts: RunOptions,
    crops: Dataset,
    data: dict,
    dist: DistInfo,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train on ``crops`` (a dataset with ``set_epoch`` whose items are ``(1, 2S, 2S, 2S)`` crops).

    ``data`` holds ``spacing``, ``window`` and ``corpus`` (the fingerprint) for the checkpoint metadata, and
    anything else worth recording in config.json (inputs, cache). A checkpoint and a resume state are saved
    whichever way it ends (see :class:`RunResult`). A new run (not ``resume``) refuses a folder holding a run
    (:class:`RunFolderError`) unless ``overwrite``, which removes that run's files first.
    """
    out = Path(out_dir)
    # also a barrier: no rank reads the folder while rank 0 clears it
    _on_every_rank(dist, prepare_folder, out, resume, overwrite, dist)
    run = build_run(out, opts, crops, data, dist)
    if resume:
        restore_run(run)
    report_start(run, len(crops), resume)
    if run.start >= run.sched.total_steps:
        return complete_schedule(run)
    return train(run, crops)
