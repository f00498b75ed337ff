"""A pre-training run: :func:`run_pretraining` builds the model, restores a checkpoint, and drives
:func:`.engine.train_steps`, saving and reporting as it goes.

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
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import __version__, build_pretraining_model
from ..checkpoint import CheckpointError, CheckpointMetadata, save_checkpoint, save_resume_state
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
    dense_execution: bool = False  # compute masked voxels too (model packed=False): same maths, the reference
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
        o |= {"packed": False} if self.dense_execution else {}
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


def setup_logging(out_dir: str | Path, is_main: bool = True) -> None:
    """Console (through tqdm, so the bar survives) and, on rank 0, ``train.log`` in the run folder."""

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

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


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, save, leave. A second signal aborts at once (the previous
    checkpoint stays intact: writes are atomic)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning(
            "%s received: finishing this step, saving, then stopping (send it again to abort now)",
            signal.Signals(signum).name,
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _on_every_rank(fn, dist: DistInfo):
    """``fn()`` on each rank; an exception on any rank is raised on all of them (no rank is left waiting in a
    collective for one that died)."""
    error: BaseException | None = None
    try:
        result = fn()
    except (CheckpointError, ValueError, OSError) as e:
        error = e
    if any_rank(error is not None, dist):
        if error is not None:
            raise error
        raise ResumeError("another rank failed to set up the run (its log says why)")
    return result


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

    def check_folder() -> None:
        if dist.is_main:
            if problem := check_run_folder(out, resume, overwrite):
                raise RunFolderError(problem)
            remove_temporaries(out)
            if overwrite and (gone := clear_run_folder(out)):
                log.warning("--overwrite: removed %s from %s", ", ".join(gone), out)

    _on_every_rank(check_folder, dist)  # also a barrier: no rank reads the folder while rank 0 clears it
    precision = resolve_precision(opts.precision, dist.device)
    torch.manual_seed(opts.seed)  # the initial weights (DDP also broadcasts rank 0's)
    model = build_pretraining_model(opts.preset, **opts.model_overrides()).to(dist.device)
    order = CropOrder(len(crops), opts.batch_size, opts.accumulate, dist.world_size, dist.rank, opts.seed)
    sched = plan_schedule(opts, order.steps_per_epoch, dist.world_size)
    optimizer = build_optimizer(model, sched.lr, opts.weight_decay)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    start, pair_complete = 0, False  # pair_complete: the latest pair on disk is whole (may become the fallback)
    if resume:
        start, pair_complete = _on_every_rank(
            lambda: restore(out, model, optimizer, scaler, order, opts, dist, data), dist
        )
    order.start_step = start
    end = sched.total_steps if opts.stop_after is None else min(sched.total_steps, start + opts.stop_after)

    def metadata(step: int) -> CheckpointMetadata:
        return CheckpointMetadata(
            preset=opts.preset, config=model.config.to_dict(), spacing=[float(s) for s in data["spacing"]],
            intensity_window=[float(w) for w in data["window"]], token_size=TOKEN_SIZE,
            input_size=model.input_size, crop_size=model.crop_size, corpus=data.get("corpus", {}), step=step,
            epoch=step // sched.steps_per_epoch, code_version=__version__,
        )  # fmt: skip

    preview_crop = EpochCrops(crops)[0, 0][None] if dist.is_main else None
    probe = None
    if opts.probe and dist.is_main:
        from .probe import LinearProbe

        probe = LinearProbe.from_dataset(opts.probe, opts.probe_cases, model.crop_size, data["spacing"],
                                         data["window"], opts.seed)  # fmt: skip

    def write(step: int, final: bool) -> None:
        nonlocal pair_complete
        if dist.is_main:
            if pair_complete:  # keep the whole pair on disk until the new one is whole too
                keep_previous_pair(out)
            pair_complete = False
            sha = save_checkpoint(out / CHECKPOINT_LATEST, model.state_dict(), metadata(step))
            save_resume_state(out / RESUME_STATE, {
                "format": RESUME_FORMAT, "step": step, "weights_sha256": sha,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "schedule": asdict(sched),
                "data": data_position(order, opts, dist, step),
                "rng": {"seed": opts.seed, "scheme": "masks: Generator(mix(seed, rank, step, micro)); "
                        "global RNG re-seeded with mix(seed, rank, step) each step; crops: (seed, epoch, index)"},
            })  # fmt: skip
            pair_complete = True
            if final:
                save_checkpoint(out / CHECKPOINT_FINAL, model.state_dict(), metadata(step))
            model.eval()
            with (
                torch.no_grad(),
                torch.autocast(dist.device.type, AUTOCAST[precision], enabled=precision != "fp32"),
            ):
                preview = model(
                    preview_crop.to(dist.device), generator=torch.Generator().manual_seed(opts.seed)
                )
            model.train()
            save_previews(preview, out / PREVIEWS, step, model.config.norm_pix_loss)
            plot_progress(read_metrics(out), out / PROGRESS)
            log.info(
                "step %d: saved %s%s",
                step,
                out / CHECKPOINT_LATEST,
                " and " + CHECKPOINT_FINAL if final else "",
            )

    def save(step: int, final: bool = False) -> None:
        """Called on every rank; rank 0 writes. It ends in a collective, which also carries a failure of rank 0's
        writes (disk full, permissions) to every rank instead of leaving them waiting."""
        error: Exception | None = None
        try:
            write(step, final)
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            error = e
        if any_rank(error is not None, dist):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed to save step {step} (its log says why)")

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        reset_metrics(out, start if resume else None)
        info = {"options": asdict(opts), "model": model.config.to_dict(),
                "data": {k: v for k, v in data.items() if k != "corpus"},
                "derived": asdict(sched) | {"precision": precision, "world_size": dist.world_size,
                                            "device": str(dist.device)},
                "code_version": __version__}  # fmt: skip
        write_config(out, info)
        log.info(
            "%s%s: preset %s, %d volumes, %d crops per step (%d x %d accumulated x %d processes), lr %.3g, "
            "%d steps (%d per epoch, warm-up %d), precision %s on %s",
            "resuming " if resume else "",
            out,
            opts.preset,
            len(crops),
            sched.effective_batch,
            opts.batch_size,
            opts.accumulate,
            dist.world_size,
            sched.lr,
            sched.total_steps,
            sched.steps_per_epoch,
            sched.warmup_steps,
            precision,
            dist.device,
        )
    if start >= sched.total_steps:
        # rank 0 decides, every rank saves: save() ends in a barrier every rank must reach
        if any_rank(dist.is_main and not (out / CHECKPOINT_FINAL).is_file(), dist):
            save(start, final=True)
        log.info("the schedule (%d steps) is already complete", sched.total_steps)
        return RunResult("finished", start, model)

    net = model
    if dist.enabled:
        # The 1x1x1 conv weights' gradients come out channels-last, so DDP copies them into its buckets: harmless
        # (a few small tensors), but it warns on every rank at the first step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    loader = DataLoader(
        EpochCrops(crops),
        batch_size=opts.batch_size,
        sampler=order,
        num_workers=opts.num_workers,
        pin_memory=dist.device.type == "cuda",
        worker_init_fn=ignore_stop_signals if opts.num_workers else None,
    )
    stop = StopRequest()
    t_start = time.perf_counter()
    bar = tqdm(
        total=sched.total_steps,
        initial=start,
        unit="step",
        disable=not (dist.is_main and opts.progress),
        dynamic_ncols=True,
        desc="pre-training",
    )
    metrics_file = open_metrics(out) if dist.is_main else None

    def on_step(step: int, m: dict) -> bool:
        if probe is not None and (step == start + 1 or step % opts.probe_every == 0 or step == end):
            m = m | probe(model.encoder, dist.device, AUTOCAST[precision])
        if dist.is_main:
            append_metrics(metrics_file, {"step": step, "epoch": step / sched.steps_per_epoch} | m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", crops_s=f"{m['crops_per_s']:.2f}")
            if step % opts.log_every == 0 or step == end:
                eta = (time.perf_counter() - t_start) / (step - start) * (sched.total_steps - step)
                log.info(
                    "step %d/%d epoch %.2f | %s | lr %.3g | %.2f crops/s | ETA %s",
                    step,
                    sched.total_steps,
                    step / sched.steps_per_epoch,
                    " ".join(f"{k} {m[k]:.4f}" for k in m if k[:3] in ("los", "rec", "ali")),
                    m["lr"],
                    m["crops_per_s"],
                    tqdm.format_interval(eta),
                )
        stopping = any_rank(stop.requested, dist)
        if stopping or step % opts.save_every == 0 or step == end:
            save(step, final=step == sched.total_steps)
        return stopping

    try:
        done = train_steps(
            net,
            iter(loader),
            optimizer,
            scaler,
            sched.lr_at,
            start,
            end,
            opts.accumulate,
            opts.seed,
            dist,
            precision,
            opts.clip_grad,
            on_step,
        )
    finally:
        stop.restore()
        bar.close()
        if metrics_file:
            metrics_file.close()
    if done >= sched.total_steps:
        log.info("finished: %s", out / CHECKPOINT_FINAL)
        return RunResult("finished", done, model)
    how = "interrupted" if stop.requested else "stopped"
    log.info(
        "%s at step %d of %d; continue with: mim_nnunet_pretrain -o %s --resume",
        how,
        done,
        sched.total_steps,
        out,
    )
    return RunResult(how, done, model, stop.signum)
