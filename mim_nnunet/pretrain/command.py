"""The ``mim_nnunet_pretrain`` command as library steps, from its parsed options to an exit status.

:func:`pretrain_command` reads top to bottom: check the request (:func:`check_request`: ``--resume`` /
``--overwrite``, the requeue rule and the resumed options of :mod:`.resume`, the run folder of :mod:`.folder`),
set up processes and logging, fill or check the cache (:func:`prepare_cache`, rank 0, stopped by SIGINT/SIGTERM
through :class:`mim_nnunet.interrupt.StopRequest`), then train (:func:`train_on_cache`). ``mim_nnunet.cli.pretrain``
only parses the command line and calls it; a script can call it with a namespace of the same fields.

Exit statuses: 0 done (or stopped by ``--stop-after``), 2 a refused request or a failure with its reason logged,
128 + signal when SIGINT (130) or SIGTERM (143) stopped it; :class:`UsageError` and :class:`CommandError` are the
refusals before anything ran (the command line turns them into its usage error and exit status).
"""

from __future__ import annotations

import logging
import signal
import sys
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

from ..checkpoint import CheckpointError
from ..data.cache import (
    FINGERPRINT,
    INDEX,
    SKIPPED_TXT,
    cache_identity,
    cache_user,
    check_cache_identity,
    load_fingerprint,
)
from ..data.preprocess import PreprocessSettings, preprocess_corpus
from ..interrupt import StopRequest
from ..model.config import preset_crop_size
from .distributed import DistInfo, any_rank, init_distributed, shutdown
from .folder import DEFAULT_CACHE, RunFolderError, check_run_folder, clear_run_folder
from .resume import (
    ResumeError,
    absolute_input,
    begins_instead_of_resuming,
    other_cases_indexed,
    resumed_arguments,
    spacing3,
)
from .run import RunOptions, run_pretraining, setup_logging

log = logging.getLogger("mim_nnunet.pretrain")


class UsageError(ValueError):
    """A request the command line cannot make (the command prints its usage; exit status 2)."""


class CommandError(Exception):
    """A request refused before anything ran, with the exit status it ends with."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def check_probe(spec: str) -> None:
    from .probe import dataset_cases

    try:
        folder, cases, _ = dataset_cases(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(cases) < 2:
        raise UsageError(f"--probe {spec}: {folder} has {len(cases)} labeled cases in labelsTr, need at least 2")


def check_request(args: Namespace, given: set[str]) -> Namespace:
    """``args`` as the run will use them (a resumed run's stored options, absolute inputs), or the refusal:
    :class:`UsageError` or :class:`CommandError`. ``given``: the option names given on the command line."""
    out = Path(args.output).absolute()
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:
        if begins_instead_of_resuming(out, args.resume, args.input):
            args.resume = False  # a requeued job killed before its run began: begin it
            # (logging is not set up yet: the run folder's log opens once the request is known to be good)
            print(f"mim_nnunet_pretrain: no run in {out} yet: starting it", file=sys.stderr)
    except ResumeError as e:
        raise UsageError(f"--resume: {e}") from None
    if args.resume:
        try:
            args = resumed_arguments(args, given, out)
        except ResumeError as e:
            raise CommandError(f"--resume: {e}", code=1) from None
    elif not args.input:
        raise UsageError("give at least one -i/--input (or --resume an existing run)")
    if len(args.spacing) not in (1, 3):
        raise UsageError(f"--spacing takes one or three values, got {args.spacing}")
    if args.probe is not None:
        check_probe(args.probe)
    if problem := check_run_folder(out, args.resume, args.overwrite):
        raise CommandError(problem, code=2)
    args.input = [absolute_input(i) for i in args.input]
    return args


def run_options(args: Namespace) -> RunOptions:
    return RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})


def preprocess_settings(args: Namespace) -> PreprocessSettings:
    return PreprocessSettings(spacing=tuple(spacing3(args.spacing)), window=tuple(args.window),
                              require_air=not args.allow_no_air)  # fmt: skip


def fill_cache(args: Namespace, cache: Path, settings: PreprocessSettings) -> None:
    """Preprocess the inputs into ``cache``; a resumed run reuses its cache as it is and checks that it still holds
    the run's data (``ValueError`` / ``RuntimeError`` naming what differs)."""
    saved = getattr(args, "saved_cache_identity", {})
    if not (args.resume and (cache / FINGERPRINT).is_file()):
        preprocess_corpus(args.input, cache, settings, args.preprocess_workers, args.progress)
    elif other_cases_indexed(cache, saved, settings):
        # same settings, but the index lists the cases of another run sharing the cache: index this run's inputs
        # again (finished cases are reused; nothing is deleted)
        log.warning("%s lists another run's cases: indexing this run's inputs again", cache / INDEX)
        preprocess_corpus(args.input, cache, settings, args.preprocess_workers, args.progress)
    if args.resume:  # the run must continue on the data it began with
        check_cache_identity(cache, saved, settings)


def prepare_cache(args: Namespace, cache: Path, settings: PreprocessSettings, dist: DistInfo) -> int | None:
    """Rank 0 fills the cache; every rank learns whether that failed (also the barrier: the other ranks wait here
    for rank 0's cache). Returns the exit status of a failure, None when the cache is ready."""
    failed, interrupted = False, None
    if dist.is_main:
        try:
            # a signal stops at once: finished cases stay in the cache and the same command continues
            with StopRequest(at_once=True):
                fill_cache(args, cache, settings)
        except (ValueError, RuntimeError) as e:
            log.error("%s", e)
            failed = True
        except KeyboardInterrupt as e:  # interrupt.Interrupted, or a KeyboardInterrupt raised elsewhere
            interrupted = getattr(e, "signum", signal.SIGINT)
            log.error(
                "%s during preprocessing: the cases finished so far stay in %s; run the same command to continue",
                signal.Signals(interrupted).name, cache,
            )  # fmt: skip
            failed = True
    if any_rank(failed, dist):
        return 128 + interrupted if interrupted else 2
    return None


def train_on_cache(args: Namespace, out: Path, cache: Path, settings: PreprocessSettings, dist: DistInfo) -> int:
    from ..data.loader import CropDataset

    crops = CropDataset(cache, preset_crop_size(args.preset), seed=args.seed)
    data = {"spacing": list(settings.spacing), "window": list(settings.window), "inputs": list(args.input),
            "cache": str(cache), "cache_identity": cache_identity(cache), "allow_no_air": args.allow_no_air,
            "corpus": load_fingerprint(cache)}  # fmt: skip
    result = run_pretraining(out, run_options(args), crops, data, dist, resume=args.resume)
    if result.status == "interrupted":
        return 128 + (result.signal or signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    return 0


def pretrain_command(args: Namespace, given: set[str]) -> int:
    """The whole command: the options of ``mim_nnunet.cli.pretrain.build_parser`` in, the exit status out."""
    args = check_request(args, given)
    out = Path(args.output).absolute()
    cache = Path(args.cache).absolute() if args.cache else out / DEFAULT_CACHE
    dist = init_distributed(args.device)
    gone = clear_run_folder(out, logs=True) if args.overwrite and dist.is_main else []  # before the log opens
    setup_logging(out, dist.is_main)
    if gone:
        log.warning("--overwrite: removed %s from %s", ", ".join(gone), out)
    settings = preprocess_settings(args)
    # rank 0 registers the run as a user of the cache: no other run may empty it meanwhile
    with cache_user(cache, settings.digest(), f"pre-training run {out}") if dist.is_main else nullcontext():
        try:
            if (failed := prepare_cache(args, cache, settings, dist)) is not None:
                return failed
            if args.preprocess_only:
                log.info("preprocess only: the cache is %s (%s, %s)", cache, FINGERPRINT, SKIPPED_TXT)
                return 0
            return train_on_cache(args, out, cache, settings, dist)
        except (CheckpointError, ResumeError, RunFolderError) as e:
            log.error("%s", e)
            return 2
        finally:
            shutdown(dist)
