"""``mim_nnunet_pretrain``: preprocess an unlabeled CT corpus and pre-train a MiM encoder on it.

Only wiring (MAE's ``main_pretrain``): options -> preprocessing (:mod:`mim_nnunet.data.preprocess`) -> crop
dataset (:mod:`mim_nnunet.data.loader`) -> :func:`mim_nnunet.pretrain.run.run_pretraining`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

from ..model.config import PRESETS
from ..pretrain.folder import DEFAULT_CACHE, check_run_folder
from ..pretrain.resume import (
    RESUMABLE,
    ResumeError,
    absolute_input,
    begins_instead_of_resuming,
    other_cases_indexed,
    resumed_arguments,
    spacing3,
)
from ..pretrain.run import RunOptions

log = logging.getLogger("mim_nnunet.pretrain")

EXAMPLES = """\
examples:
  # preprocess only (cache in RUN/cache), then look at RUN/cache/fingerprint.json
  mim_nnunet_pretrain -i /data/ct/ -i 990 -o RUN --preprocess-only
  # a tiny run on the embedded phantoms (mim_nnunet_phantoms writes the corpus)
  mim_nnunet_pretrain -i phantoms/ -o RUN --preset tiny --max-steps 20 --batch-size 2 --lr 1e-3 --save-every 10
  # continue it where it stopped (Ctrl-C or SIGTERM saves first), here with a longer schedule
  mim_nnunet_pretrain -o RUN --resume --max-steps 40
  # a requeued cluster job may repeat its whole command: with --resume it continues (or starts) the run
  mim_nnunet_pretrain -i phantoms/ -o RUN --preset tiny --max-steps 20 --batch-size 2 --lr 1e-3 --resume
  # 2 GPUs (or 2 CPU processes with --device cpu), effective batch 2 x 4 x 2 = 16
  torchrun --standalone --nproc-per-node 2 -m mim_nnunet.cli.pretrain -i /data/ct -o RUN --batch-size 2 --accumulate 4

The run folder holds checkpoint_final.safetensors (for fine-tuning), checkpoint_latest.safetensors +
resume_state.pt, train.log, metrics.jsonl, progress.png, previews/ and config.json.
"""

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "positive integer" if minimum == 1 else f"integer >= {minimum}"
    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim_nnunet_pretrain", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    d = RunOptions()
    g = p.add_argument_group("data")
    g.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="unlabeled CT, repeatable: an image file (.nii[.gz], .mha, .nrrd), a folder (searched "
        "recursively; DICOM series folders are one case per series), a glob ('**' allowed), an "
        "nnU-Net raw dataset id or name in $nnUNet_raw (imagesTr + imagesTs, labels ignored), or a "
        "manifest (.txt one spec per line, .json list)",
    )
    g.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="RUN",
        help="run folder (checkpoints, logs, pictures); created if missing. A folder holding a run is refused "
        "unless --resume or --overwrite",
    )
    g.add_argument("--cache", metavar="DIR", help="preprocessed cache (blosc2); default RUN/cache")
    g.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=[1.5],
        metavar="MM",
        help="pre-training spacing in mm: one value (isotropic) or three (z y x); default 1.5",
    )
    g.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=[-1000.0, 1000.0],
        metavar=("LO", "HI"),
        help="HU window mapped to [0, 1]; default -1000 1000",
    )
    g.add_argument(
        "--preprocess-only", action="store_true", help="preprocess the inputs into the cache and stop"
    )
    g.add_argument(
        "--preprocess-workers",
        type=NON_NEGATIVE,
        default=2,
        metavar="N",
        help="processes for preprocessing; default 2",
    )
    g.add_argument(
        "--num-workers",
        type=NON_NEGATIVE,
        default=d.num_workers,
        metavar="N",
        help=f"DataLoader workers per training process (0: load in the main process); default {d.num_workers}",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=d.preset,
        help=f"architecture size: base = the paper's (crops 192^3), small (128^3), tiny (64^3, tests); "
        f"default {d.preset}",
    )
    g.add_argument(
        "--levels",
        type=int,
        choices=[1, 2, 3],
        default=None,
        help="Mask-in-Mask levels (1 = plain hybrid MAE, the ablation baseline); default 3",
    )
    g.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in backward: less memory, more compute",
    )
    g.add_argument(
        "--dense-execution",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="compute the masked voxels too (the reference execution, same results; about 1.6-2.3x the CPU step "
        "time, docs/benchmarks.md). Default: visible voxels only",
    )
    g.add_argument(
        "--align-target",
        choices=["online", "ema"],
        default=d.align_target,
        help="target of the cross-level alignment: online = the paper's two trained heads (can collapse to one "
        "direction: watch collapse_cos/collapse_std in metrics.jsonl); ema = BYOL-style, the target is a frozen "
        f"EMA copy of the parent head; default {d.align_target}",
    )
    g.add_argument(
        "--align-ema",
        type=float,
        default=d.align_ema,
        metavar="M",
        help=f"EMA momentum per optimizer step of the --align-target ema target; default {d.align_ema}",
    )
    g = p.add_argument_group("optimisation (mim_method.md section 5)")
    g.add_argument(
        "--batch-size",
        type=POSITIVE,
        default=d.batch_size,
        metavar="N",
        help=f"crops per micro-batch per process; default {d.batch_size}",
    )
    g.add_argument(
        "--accumulate",
        type=POSITIVE,
        default=d.accumulate,
        metavar="K",
        help="micro-batches per optimizer step (gradient accumulation); effective batch = "
        f"batch size x K x processes; default {d.accumulate}",
    )
    g.add_argument(
        "--max-steps",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="length of the schedule in optimizer steps (wins over --epochs)",
    )
    g.add_argument(
        "--epochs",
        type=POSITIVE,
        default=d.epochs,
        metavar="N",
        help=f"length of the schedule in epochs (one random crop per volume each); default {d.epochs}",
    )
    g.add_argument("--lr", type=float, default=None, help="absolute peak learning rate (overrides --blr)")
    g.add_argument(
        "--blr",
        type=float,
        default=d.blr,
        help=f"base learning rate per 256 crops: lr = blr x effective batch / 256; default {d.blr}",
    )
    g.add_argument(
        "--min-lr", type=float, default=d.min_lr, help=f"lr at the end of the cosine; default {d.min_lr}"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help=f"AdamW weight decay (not on norms, biases, position embeddings, mask token); default "
        f"{d.weight_decay}",
    )
    g.add_argument(
        "--warmup-steps",
        type=NON_NEGATIVE,
        default=None,
        metavar="N",
        help="linear warm-up steps before the cosine decay; default 5%% of the schedule",
    )
    g.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the gradient norm (default: no clipping, as the paper)",
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present), cpu, cuda or cuda:N; under torchrun cuda means the local GPU",
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=d.precision,
        help="autocast precision: auto = bf16 on CUDA (fp16 + loss scaling where bf16 is missing) and "
        "fp32 on CPU (bf16 measured slower there: benchmarks/bench_precision.py); default auto",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of crops, masks and initialisation; default {d.seed}"
    )
    g.add_argument(
        "--save-every",
        type=POSITIVE,
        default=d.save_every,
        metavar="N",
        help=f"checkpoint + previews every N optimizer steps (and at the end); default {d.save_every}",
    )
    g.add_argument(
        "--log-every",
        type=POSITIVE,
        default=d.log_every,
        metavar="N",
        help=f"a line in train.log every N steps; default {d.log_every}",
    )
    g.add_argument(
        "--stop-after",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="save and leave after N steps of this invocation, the schedule unchanged (continue "
        "with --resume); for time-limited jobs",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN exactly where it stopped, with its config.json; only "
        f"{', '.join('--' + o.replace('_', '-') for o in sorted(RESUMABLE - {'progress'}))} "
        "may change (and --device, --preprocess-workers, which are never stored); the others may be repeated "
        "with their stored values (a requeued job's identical command). Without a run in RUN yet (killed "
        "before it started), the run starts",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in RUN even if it holds one: its checkpoints, resume state, metrics, log and "
        "pictures are deleted first (a cache inside RUN is kept and reused if the settings match)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g = p.add_argument_group("linear probe (watch the representations without fine-tuning)")
    g.add_argument(
        "--probe",
        metavar="DATASET",
        default=None,
        help="labeled nnU-Net raw dataset (id, name in $nnUNet_raw, or folder with imagesTr + labelsTr): every "
        "--probe-every steps, fit a logistic regression on frozen encoder features of --probe-cases cases and "
        "log its Dice on as many held-out cases (probe_dice in metrics.jsonl and progress.png)",
    )
    g.add_argument(
        "--probe-every",
        type=POSITIVE,
        default=d.probe_every,
        metavar="N",
        help=f"probe every N optimizer steps (and after the first and the last); default {d.probe_every}",
    )
    g.add_argument(
        "--probe-cases",
        type=POSITIVE,
        default=d.probe_cases,
        metavar="K",
        help=f"labeled cases to fit the probe on (the next K are held out to score it); default {d.probe_cases}",
    )
    return p


def _explicit(argv: list[str] | None) -> set[str]:
    """Names of the options given on the command line (a copy of the parser that has no defaults)."""
    p = build_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
        a.required = False
    return set(vars(p.parse_args(argv)))


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})


class _Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise _Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output).absolute()
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    try:
        if begins_instead_of_resuming(out, args.resume, args.input):
            args.resume = False  # a requeued job killed before its run began: begin it
            print(f"mim_nnunet_pretrain: no run in {out} yet: starting it", file=sys.stderr)
    except ResumeError as e:
        parser.error(f"--resume: {e}")
    if args.resume:
        try:
            args = resumed_arguments(args, _explicit(argv), out)
        except ResumeError as e:
            raise SystemExit(f"mim_nnunet_pretrain: error: --resume: {e}") from None
    elif not args.input:
        parser.error("give at least one -i/--input (or --resume an existing run)")
    if len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes one or three values, got {args.spacing}")
    if args.probe is not None:
        from ..pretrain.probe import dataset_cases

        try:
            folder, cases, _ = dataset_cases(args.probe)
        except ValueError as e:
            parser.error(str(e))
        if len(cases) < 2:
            parser.error(f"--probe {args.probe}: {folder} has {len(cases)} labeled cases in labelsTr, need at least 2")
    if problem := check_run_folder(out, args.resume, args.overwrite):
        parser.exit(2, f"mim_nnunet_pretrain: error: {problem}\n")
    args.input = [absolute_input(i) for i in args.input]
    cache = Path(args.cache).absolute() if args.cache else out / DEFAULT_CACHE

    # Heavy imports after argument parsing: --help stays instant.
    from ..checkpoint import CheckpointError
    from ..data.cache import cache_user
    from ..data.preprocess import PreprocessSettings
    from ..pretrain.distributed import init_distributed, shutdown
    from ..pretrain.folder import RunFolderError, clear_run_folder
    from ..pretrain.run import setup_logging

    dist = init_distributed(args.device)
    gone = clear_run_folder(out, logs=True) if args.overwrite and dist.is_main else []  # before the log opens
    setup_logging(out, dist.is_main)
    if gone:
        log.warning("--overwrite: removed %s from %s", ", ".join(gone), out)
    spacing = spacing3(args.spacing)
    settings = PreprocessSettings(spacing=tuple(spacing), window=tuple(args.window))
    # rank 0 registers the run as a user of the cache: no other run may empty it meanwhile
    with cache_user(cache, settings.digest(), f"pre-training run {out}") if dist.is_main else nullcontext():
        try:
            return _run(args, out, cache, settings, dist)
        except (CheckpointError, ResumeError, RunFolderError) as e:
            log.error("%s", e)
            return 2
        finally:
            shutdown(dist)


def _run(args: argparse.Namespace, out: Path, cache: Path, settings, dist) -> int:
    from ..data.cache import (
        FINGERPRINT,
        INDEX,
        SKIPPED_TXT,
        cache_identity,
        check_cache_identity,
        load_fingerprint,
    )
    from ..data.loader import CropDataset
    from ..data.preprocess import preprocess_corpus
    from ..pretrain.distributed import any_rank
    from ..pretrain.run import run_pretraining

    failed, interrupted = False, None
    if dist.is_main:
        # SIGTERM (Slurm, scancel) and SIGINT: stop preprocessing with a line, not a traceback; finished cases
        # stay in the cache and the same command continues. Installed explicitly, as training does: a process
        # started in the background by a shell inherits an ignored SIGINT.
        previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            saved = getattr(args, "saved_cache_identity", {})
            if not (args.resume and (cache / FINGERPRINT).is_file()):
                preprocess_corpus(args.input, cache, settings, args.preprocess_workers, args.progress)
            elif other_cases_indexed(cache, saved, settings):
                # same settings, but the index lists the cases of another run sharing the cache: index this
                # run's inputs again (finished cases are reused; nothing is deleted)
                log.warning("%s lists another run's cases: indexing this run's inputs again", cache / INDEX)
                preprocess_corpus(args.input, cache, settings, args.preprocess_workers, args.progress)
            if args.resume:  # the run must continue on the data it began with
                check_cache_identity(cache, saved, settings)
        except (ValueError, RuntimeError) as e:
            log.error("%s", e)
            failed = True
        except (KeyboardInterrupt, _Interrupted) as e:
            interrupted = getattr(e, "signum", signal.SIGINT)
            log.error(
                "%s during preprocessing: the cases finished so far stay in %s; run the same command to continue",
                signal.Signals(interrupted).name, cache,
            )  # fmt: skip
            failed = True
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if any_rank(failed, dist):  # also the barrier: the other ranks wait here for rank 0's cache
        return 128 + interrupted if interrupted else 2
    if args.preprocess_only:
        log.info("preprocess only: the cache is %s (%s, %s)", cache, FINGERPRINT, SKIPPED_TXT)
        return 0
    opts = _options(args)
    crops = CropDataset(cache, 2 * PRESETS[args.preset]["input_size"], seed=args.seed)
    data = {"spacing": list(settings.spacing), "window": list(settings.window), "inputs": list(args.input),
            "cache": str(cache), "cache_identity": cache_identity(cache),
            "corpus": load_fingerprint(cache)}  # fmt: skip
    result = run_pretraining(out, opts, crops, data, dist, resume=args.resume)
    if result.status == "interrupted":
        return 128 + (result.signal or signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
