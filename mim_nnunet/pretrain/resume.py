"""What may change when a pre-training run continues, and the checks that it may: one place for the CLI and for
library callers (:func:`mim_nnunet.pretrain.run.run_pretraining` with ``resume=True``).

- Options: :data:`RESUMABLE` may change on ``--resume``; :data:`PER_INVOCATION` belong to one invocation and are
  never taken from the stored run; every other option and the data settings (inputs, cache, spacing, window,
  allow_no_air) are the run's (:func:`resumed_arguments`).
- The requeue rule: ``--resume`` on a folder without a run yet, with inputs given, starts the run (a requeued job
  killed before its run began repeats its whole command line) (:func:`begins_instead_of_resuming`).
- The cache: a resumed run continues on the data it began with; a cache whose index another run with the same
  settings replaced is indexed again (:func:`other_cases_indexed`), any other change is refused
  (:func:`mim_nnunet.data.cache.check_cache_identity`).
- The checkpoint: the latest pair, or the previous one when the latest is incomplete; same model configuration
  (execution fields aside), same data, same data order (:func:`restore`).

The run folder's files are :mod:`.folder`'s; docs/pretraining.md, "Run folder and resume rules", explains all of it.
"""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    check_state_dict,
    load_checkpoint,
    load_resume_state,
)
from ..data.cache import cache_identity
from ..model.config import EXECUTION_FIELDS, MiMConfig
from .distributed import DistInfo
from .folder import CONFIG, PAIRS, has_run, options_from_config, read_config
from .sampler import CropOrder

if TYPE_CHECKING:
    from ..data.preprocess import PreprocessSettings

log = logging.getLogger("mim_nnunet.pretrain")

RESUME_FORMAT = 1  # resume_state.pt's "format"

# Options that may change when a run is resumed; the others are fixed by the run's config.json.
PER_INVOCATION = {"stop_after", "progress"}
RESUMABLE = {
    "max_steps",
    "epochs",
    "num_workers",
    "save_every",
    "log_every",
    "stop_after",
    "progress",
    "precision",
    "grad_checkpointing",  # execution only: the maths, and so the run, stay the same
    "packed",  # --dense-execution
    "probe",  # the probe only watches: it changes nothing in training
    "probe_every",
    "probe_cases",
}


class ResumeError(ValueError):
    """A run that cannot continue (other data, other model, nothing usable saved); one line naming the files."""


def begins_instead_of_resuming(out: str | Path, resume: bool, inputs: list[str]) -> bool:
    """The requeue rule: ``--resume`` on a folder without a run, with inputs, starts it. Without inputs it is an
    error (:class:`ResumeError`): there is nothing to resume and nothing to start."""
    if not resume or has_run(out):
        return False
    if not inputs:
        raise ResumeError(f"{Path(out) / CONFIG} not found; {out} is not a pre-training run folder")
    return True


def absolute_input(spec: str) -> str:
    """An input spec as stored in config.json: paths and globs made absolute (a resume from another directory
    must find them), nnU-Net dataset ids and names kept."""
    if os.path.exists(spec) or any(c in spec for c in "*?["):
        return os.path.abspath(spec)
    return spec


def spacing3(values) -> list[float]:
    values = [float(v) for v in values]
    return values * 3 if len(values) == 1 else values


def resumed_arguments(args: Namespace, given: set[str], out: Path) -> Namespace:
    """``args`` of a resumed run: the stored options and data settings of ``out``'s config.json, except those of
    :data:`RESUMABLE` given again (``given``: the names given on the command line). A stored value given again
    must be equal (a requeued job repeats its whole command line); else :class:`ResumeError` names both."""
    path = Path(out) / CONFIG
    try:
        saved = read_config(out)
    except ValueError as e:
        raise ResumeError(str(e)) from None
    opts, data = options_from_config(saved["options"]), saved["data"]
    # Values given again must equal the stored ones: a requeued job repeats its whole command line.
    clash = {k: (opts[k], getattr(args, k)) for k in sorted(given & (set(opts) - RESUMABLE))
             if json.dumps(getattr(args, k)) != json.dumps(opts[k])}  # fmt: skip

    if "input" in given:
        old, new = [absolute_input(i) for i in data["inputs"]], [absolute_input(i) for i in args.input]
        if old != new:
            clash["input"] = (data["inputs"], new)
    # (config.json files of older versions hold paths as typed: taken relative to the current directory)
    if "cache" in given and os.path.abspath(args.cache) != os.path.abspath(data["cache"]):
        clash["cache"] = (data["cache"], os.path.abspath(args.cache))
    if "spacing" in given and spacing3(args.spacing) != spacing3(data["spacing"]):
        clash["spacing"] = (data["spacing"], args.spacing)
    if "window" in given and [float(w) for w in args.window] != [float(w) for w in data["window"]]:
        clash["window"] = (data["window"], args.window)
    if "allow_no_air" in given and args.allow_no_air != data.get("allow_no_air", False):
        clash["allow_no_air"] = (data.get("allow_no_air", False), args.allow_no_air)
    if clash:
        detail = "; ".join(f"{k}: run {old!r}, given {new!r}" for k, (old, new) in clash.items())
        raise ResumeError(
            f"{', '.join(clash)} cannot change in a resumed run ({detail}; see {path}); start a new run in another "
            "folder instead"
        )
    for k, v in opts.items():
        # stop_after and progress belong to one invocation; the rest is the run's unless given again.
        if k not in PER_INVOCATION and (k not in given or k not in RESUMABLE):
            setattr(args, k, v)
    args.input, args.cache = data["inputs"], data["cache"]
    args.spacing, args.window = data["spacing"], data["window"]
    args.allow_no_air = data.get("allow_no_air", False)  # runs before the option were all checked for air
    args.saved_cache_identity = data.get("cache_identity", {})
    return args


def other_cases_indexed(cache: Path, saved: dict, settings: PreprocessSettings) -> bool:
    """The cache has this run's settings, but its index lists the cases of another run sharing it."""
    try:
        now = cache_identity(cache)
    except RuntimeError:
        return False
    return (
        now["settings_digest"] == now["index_digest"] == settings.digest()
        and "cases_sha256" in saved
        and now["cases_sha256"] != saved["cases_sha256"]
    )


def same_json(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def check_data(path: Path, meta: CheckpointMetadata, data: dict) -> None:
    """The checkpoint must have been trained on the data of this invocation (spacing, window, corpus)."""
    problems = []
    if not same_json(meta.spacing, [float(v) for v in data["spacing"]]):
        problems.append(f"spacing {meta.spacing} vs now {list(data['spacing'])}")
    if not same_json(meta.intensity_window, [float(v) for v in data["window"]]):
        problems.append(f"window {meta.intensity_window} vs now {list(data['window'])}")
    old, new = meta.corpus or {}, data.get("corpus") or {}
    digest_old, digest_new = (
        (old.get("settings") or {}).get("digest"),
        (new.get("settings") or {}).get("digest"),
    )
    if digest_old and digest_new and digest_old != digest_new:
        problems.append(f"cache settings digest {digest_old} vs now {digest_new}")
    if "num_cases" in old and "num_cases" in new and old["num_cases"] != new["num_cases"]:
        problems.append(f"{old['num_cases']} cases vs now {new['num_cases']}")
    if problems:
        raise ResumeError(
            f"{path}: trained on other data than it would continue on ({'; '.join(problems)}); start a new run "
            "(-o elsewhere) for other data"
        )


def config_with_defaults(config: dict) -> dict:
    """A checkpoint's config with the fields added since it was written at their defaults.

    Every field added to :class:`MiMConfig` defaults to the behaviour before it existed (e.g. ``align_target``
    'online', ``conv_ln_eps`` 1e-6), so a run saved by an older version resumes; unknown keys stay as they are.
    """
    try:
        full = MiMConfig.from_dict(config).to_dict()
    except (TypeError, ValueError):
        return config
    return json.loads(json.dumps(full))


def load_pair(out: Path, expected: dict) -> tuple[dict, CheckpointMetadata, dict, bool] | None:
    """The weights, metadata and resume state of ``out``'s latest pair, or of the previous pair (with a warning)
    when the latest is incomplete; and whether the latest was used. None when nothing was saved yet. The weights
    must fit ``expected`` (a state dict) and the resume state must name their sha256; when no pair passes,
    :class:`CheckpointError` lists why. Shared by pre-training and classification runs."""
    pairs = [(out / w, out / r) for w, r in PAIRS]
    if not any(p.exists() for pair in pairs for p in pair):
        return None
    problems = []
    for latest, (path, rs_path) in zip((True, False), pairs, strict=True):
        if not (path.exists() or rs_path.exists()):
            continue
        try:
            state, meta = load_checkpoint(path)
            check_state_dict(path, state, expected)
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
        if not latest:
            log.warning(
                "%s: the latest checkpoint is incomplete (%s); continuing from the previous pair, step %s",
                out, problems[0], rs.get("step"),
            )  # fmt: skip
        return state, meta, rs, latest
    raise CheckpointError(f"{out}: no usable checkpoint to resume from: {' | '.join(problems)}")


def restore(
    out: Path, model, optimizer, scaler, order: CropOrder, opts, dist: DistInfo, data: dict
) -> tuple[int, bool]:
    """Load weights and resume state of ``out``: the latest pair, or the previous one when the latest is
    incomplete (:func:`load_pair`). Returns the step to continue from and whether the latest pair was used (0,
    False: nothing saved yet). Integrity problems are :class:`CheckpointError`, incompatibilities
    :class:`ResumeError`."""
    found = load_pair(out, model.state_dict())
    if found is None:
        log.warning("%s: no checkpoint saved yet (stopped before its first save): starting from step 0", out)
        return 0, False
    state, meta, rs, latest = found
    path = out / PAIRS[0 if latest else 1][0]
    mine = json.loads(json.dumps(model.config.to_dict()))
    theirs = config_with_defaults(meta.config)
    diff = sorted(k for k in set(mine) | set(theirs) if k not in EXECUTION_FIELDS and mine.get(k) != theirs.get(k))
    if diff:
        raise ResumeError(f"{path}: written for another model configuration (differs in {diff})")
    check_data(path, meta, data)
    expected = data_position(order, opts, dist, rs["step"])
    changed = {k: (rs["data"].get(k), v) for k, v in expected.items() if rs["data"].get(k) != v}
    if changed:
        raise ResumeError(
            f"{out}: cannot continue exactly, the data order depends on {sorted(changed)} "
            f"(saved vs now: {changed}); start a new run (-o elsewhere) to change them"
        )
    model.load_state_dict(state)
    optimizer.load_state_dict(rs["optimizer"])
    scaler.load_state_dict(rs["scaler"])
    return int(rs["step"]), latest


def data_position(order: CropOrder, opts, dist: DistInfo, step: int) -> dict:
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
