"""A pre-training run: its folder, options, checkpoints and resume, and :func:`run_pretraining` that drives
:func:`.engine.train_steps`.

Layout of the run folder::

    config.json                    options, model config, data settings, derived values (lr, steps, precision)
    checkpoint_latest.safetensors  weights + metadata (mim_nnunet.checkpoint), every --save-every steps
    checkpoint_final.safetensors   the same at the end of the schedule: the file fine-tuning uses
    resume_state.pt                optimizer, scaler, schedule, data position and seeds of checkpoint_latest
    checkpoint_previous.safetensors + resume_state_previous.pt   the pair before (hard links where possible)
    train.log, metrics.jsonl       the log; one JSON line of losses, lr and throughput per optimizer step
    progress.png                   losses and lr over steps
    previews/step_XXXXX_level{1,2,3}.png  reconstruction of a fixed crop at every checkpoint

Only rank 0 writes; every rank reaches every collective (barriers included). The weights are written before
the resume state, and the resume state records the sha256 of the weights it belongs to, so a kill between the
two writes is detected on resume instead of silently continuing from a mismatched optimizer state. Before a new
pair is written, the complete one on disk is kept as the ``previous`` pair; resume falls back to it (with a
warning) when the latest pair is incomplete, so a kill at any point of a save leaves a way on.

A new run refuses a folder that already holds a run (:func:`check_run_folder`) unless asked to overwrite it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from ..checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    check_state_dict,
    load_checkpoint,
    load_resume_state,
    save_checkpoint,
    save_resume_state,
)
from ..model.config import EXECUTION_FIELDS, TOKEN_SIZE, MiMConfig
from ..plots import plot_progress, save_previews
from .distributed import DistInfo, any_rank
from .engine import AUTOCAST, train_steps
from .optim import build_optimizer, lr_at, scaled_lr
from .sampler import CropOrder, EpochCrops, ignore_stop_signals

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
RESUME_FORMAT = 1
# Files that make a folder a run (a preprocess-only invocation leaves train.log and cache/, which do not count).
RUN_FILES = (CONFIG, CHECKPOINT_LATEST, CHECKPOINT_FINAL, RESUME_STATE, CHECKPOINT_PREVIOUS, RESUME_STATE_PREVIOUS,
             METRICS)  # fmt: skip


class ResumeError(ValueError):
    """A run that cannot continue (other data, other model, nothing usable saved); one line naming the files."""


class RunFolderError(ValueError):
    """A new run pointed at a folder that already holds one."""

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


def read_metrics(out_dir: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of ``metrics.jsonl``; a line that is not a whole record (a kill mid-write) is skipped with a
    warning."""
    path = out_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: line %d is not a complete record (%.60r), skipped", path, n, line)
            continue
        records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def check_run_folder(out: str | Path, resume: bool, overwrite: bool) -> str | None:
    """Why a run may not start in ``out`` (one line), or None. A new run needs a folder without a run in it."""
    out = Path(out)
    if resume and overwrite:
        return "--resume and --overwrite exclude each other"
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not (resume or overwrite):
        return (
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, replace it with "
            "--overwrite, or give another -o"
        )
    return None


def clear_run_folder(out: str | Path, logs: bool = False) -> list[str]:
    """Remove a run's files from ``out`` (``--overwrite``); the cache, if inside, stays. Returns what went."""
    out = Path(out)
    gone = []
    for name in (*RUN_FILES, PROGRESS, *((LOG,) if logs else ())):
        if (out / name).exists():
            (out / name).unlink()
            gone.append(name)
    if (out / PREVIEWS).is_dir():
        shutil.rmtree(out / PREVIEWS)
        gone.append(PREVIEWS)
    return gone


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link (instant) or, where links fail, a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _check_data(path: Path, meta: CheckpointMetadata, data: dict) -> None:
    """The checkpoint must have been trained on the data of this invocation (spacing, window, corpus)."""
    problems = []
    if not _same(meta.spacing, [float(v) for v in data["spacing"]]):
        problems.append(f"spacing {meta.spacing} vs now {list(data['spacing'])}")
    if not _same(meta.intensity_window, [float(v) for v in data["window"]]):
        problems.append(f"window {meta.intensity_window} vs now {list(data['window'])}")
    old, new = meta.corpus or {}, data.get("corpus") or {}
    digest_old, digest_new = (old.get("settings") or {}).get("digest"), (new.get("settings") or {}).get("digest")
    if digest_old and digest_new and digest_old != digest_new:
        problems.append(f"cache settings digest {digest_old} vs now {digest_new}")
    if "num_cases" in old and "num_cases" in new and old["num_cases"] != new["num_cases"]:
        problems.append(f"{old['num_cases']} cases vs now {new['num_cases']}")
    if problems:
        raise ResumeError(
            f"{path}: trained on other data than it would continue on ({'; '.join(problems)}); start a new run "
            "(-o elsewhere) for other data"
        )


def _config_with_defaults(config: dict) -> dict:
    """A checkpoint's config with the fields added since it was written at their defaults.

    Every field added to :class:`MiMConfig` defaults to the behaviour before it existed (e.g. ``align_target``
    'online', ``conv_ln_eps`` 1e-6), so a run saved by an older version resumes; unknown keys stay as they are.
    """
    try:
        full = MiMConfig.from_dict(config).to_dict()
    except (TypeError, ValueError):
        return config
    return json.loads(json.dumps(full))


def _restore(
    out: Path, model, optimizer, scaler, order: CropOrder, opts: RunOptions, dist: DistInfo, data: dict
) -> tuple[int, bool]:
    """Load weights and resume state of ``out``: the latest pair, or the previous one when the latest is
    incomplete. Returns the step to continue from and whether the latest pair was used (0, False: nothing
    saved yet). Integrity problems are :class:`CheckpointError`, incompatibilities :class:`ResumeError`."""
    pairs = [(out / CHECKPOINT_LATEST, out / RESUME_STATE), (out / CHECKPOINT_PREVIOUS, out / RESUME_STATE_PREVIOUS)]
    if not any(p.exists() for pair in pairs for p in pair):
        log.warning("%s: no checkpoint saved yet (stopped before its first save): starting from step 0", out)
        return 0, False
    problems = []
    for latest, (path, rs_path) in zip((True, False), pairs, strict=True):
        if not (path.exists() or rs_path.exists()):
            continue
        try:
            state, meta = load_checkpoint(path)
            check_state_dict(path, state, model.state_dict())
            rs = load_resume_state(rs_path)
            if not isinstance(rs, dict) or rs.get("weights_sha256") != meta.weights_sha256:
                step = rs.get("step") if isinstance(rs, dict) else None
                raise CheckpointError(
                    f"{rs_path}: belongs to step {step}, but {path} holds step {meta.step} (killed between the two "
                    "writes)"
                )
        except CheckpointError as e:
            problems.append(str(e))
            continue
        mine = json.loads(json.dumps(model.config.to_dict()))
        theirs = _config_with_defaults(meta.config)
        diff = sorted(
            k for k in set(mine) | set(theirs) if k not in EXECUTION_FIELDS and mine.get(k) != theirs.get(k)
        )
        if diff:
            raise ResumeError(f"{path}: written for another model configuration (differs in {diff})")
        _check_data(path, meta, data)
        expected = _data_position(order, opts, dist, rs["step"])
        changed = {k: (rs["data"].get(k), v) for k, v in expected.items() if rs["data"].get(k) != v}
        if changed:
            raise ResumeError(
                f"{out}: cannot continue exactly, the data order depends on {sorted(changed)} "
                f"(saved vs now: {changed}); start a new run (-o elsewhere) to change them"
            )
        if not latest:
            log.warning(
                "%s: the latest checkpoint is incomplete (%s); continuing from the previous pair, step %d",
                out, problems[0], rs["step"],
            )  # fmt: skip
        model.load_state_dict(state)
        optimizer.load_state_dict(rs["optimizer"])
        scaler.load_state_dict(rs["scaler"])
        return int(rs["step"]), latest
    raise CheckpointError(f"{out}: no usable checkpoint to resume from: {' | '.join(problems)}")


def _data_position(order: CropOrder, opts: RunOptions, dist: DistInfo, step: int) -> dict:
    return {
        "num_volumes": order.n,
        "batch_size": opts.batch_size,
        "accumulate": opts.accumulate,
        "world_size": dist.world_size,
        "seed": opts.seed,
        "steps_per_epoch": order.steps_per_epoch,
        # where the stream of crops continues (derived from the step; recorded for people, checked on resume)
        "epoch": step // order.steps_per_epoch,
        "crops_into_epoch_per_rank": (step % order.steps_per_epoch) * order.per_step,
    }


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
            # temporaries of writes cut short by SIGKILL (the files they were to replace are intact)
            for name in (*RUN_FILES, PROGRESS):
                for tmp in out.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
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
            lambda: _restore(out, model, optimizer, scaler, order, opts, dist, data), dist
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
                _link_or_copy(out / RESUME_STATE, out / RESUME_STATE_PREVIOUS)
                _link_or_copy(out / CHECKPOINT_LATEST, out / CHECKPOINT_PREVIOUS)
            pair_complete = False
            sha = save_checkpoint(out / CHECKPOINT_LATEST, model.state_dict(), metadata(step))
            save_resume_state(out / RESUME_STATE, {
                "format": RESUME_FORMAT, "step": step, "weights_sha256": sha,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "schedule": asdict(sched),
                "data": _data_position(order, opts, dist, step),
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
        records = read_metrics(out, start) if resume else []
        (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
        info = {"options": asdict(opts), "model": model.config.to_dict(),
                "data": {k: v for k, v in data.items() if k != "corpus"},
                "derived": asdict(sched) | {"precision": precision, "world_size": dist.world_size,
                                            "device": str(dist.device)},
                "code_version": __version__}  # fmt: skip
        (out / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
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
    metrics_file = open(out / METRICS, "a") if dist.is_main else None  # noqa: SIM115 -- closed below

    def on_step(step: int, m: dict) -> bool:
        if probe is not None and (step == start + 1 or step % opts.probe_every == 0 or step == end):
            m = m | probe(model.encoder, dist.device, AUTOCAST[precision])
        if dist.is_main:
            metrics_file.write(json.dumps({"step": step, "epoch": step / sched.steps_per_epoch} | m) + "\n")
            metrics_file.flush()
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
