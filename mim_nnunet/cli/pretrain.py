"""``mim_nnunet_pretrain``: preprocess an unlabeled CT corpus and pre-train a MiM encoder on it.

Only wiring (MAE's ``main_pretrain``): options -> preprocessing (:mod:`mim_nnunet.data.preprocess`) -> crop
dataset (:mod:`mim_nnunet.data.loader`) -> :func:`mim_nnunet.pretrain.run.run_pretraining`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from ..model.config import PRESETS
from ..pretrain.run import CONFIG, RunOptions

log = logging.getLogger("mim_nnunet.pretrain")

EXAMPLES = """\
examples:
  # preprocess only (cache in RUN/cache), then look at RUN/cache/fingerprint.json
  mim_nnunet_pretrain -i /data/ct/ -i 990 -o RUN --preprocess-only
  # a tiny run on the embedded phantoms (mim_nnunet_phantoms writes the corpus)
  mim_nnunet_pretrain -i phantoms/ -o RUN --preset tiny --max-steps 20 --batch-size 2 --lr 1e-3 --save-every 10
  # continue it where it stopped (Ctrl-C saves first), here with a longer schedule
  mim_nnunet_pretrain -o RUN --resume --max-steps 40
  # 2 GPUs (or 2 CPU processes with --device cpu), effective batch 2 x 4 x 2 = 16
  torchrun --standalone --nproc-per-node 2 -m mim_nnunet.cli.pretrain -i /data/ct -o RUN --batch-size 2 --accumulate 4

The run folder holds checkpoint_final.safetensors (for fine-tuning), checkpoint_latest.safetensors +
resume_state.pt, train.log, metrics.jsonl, progress.png, previews/ and config.json.
"""

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
    "dense_execution",
    "probe",  # the probe only watches: it changes nothing in training
    "probe_every",
    "probe_cases",
}


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
        help="run folder (checkpoints, logs, pictures); created if missing",
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
        type=int,
        default=2,
        metavar="N",
        help="processes for preprocessing; default 2",
    )
    g.add_argument(
        "--num-workers",
        type=int,
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
        type=int,
        default=d.batch_size,
        metavar="N",
        help=f"crops per micro-batch per process; default {d.batch_size}",
    )
    g.add_argument(
        "--accumulate",
        type=int,
        default=d.accumulate,
        metavar="K",
        help="micro-batches per optimizer step (gradient accumulation); effective batch = "
        f"batch size x K x processes; default {d.accumulate}",
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="length of the schedule in optimizer steps (wins over --epochs)",
    )
    g.add_argument(
        "--epochs",
        type=int,
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
        type=int,
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
        type=int,
        default=d.save_every,
        metavar="N",
        help=f"checkpoint + previews every N optimizer steps (and at the end); default {d.save_every}",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        metavar="N",
        help=f"a line in train.log every N steps; default {d.log_every}",
    )
    g.add_argument(
        "--stop-after",
        type=int,
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
        "may change (and --device, --preprocess-workers, which are never stored)",
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
        type=int,
        default=d.probe_every,
        metavar="N",
        help=f"probe every N optimizer steps (and after the first and the last); default {d.probe_every}",
    )
    g.add_argument(
        "--probe-cases",
        type=int,
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


def _resume_args(args: argparse.Namespace, given: set[str], out: Path) -> argparse.Namespace:
    path = out / CONFIG
    if not path.is_file():
        raise SystemExit(f"--resume: {path} not found; {out} is not a pre-training run folder")
    saved = json.loads(path.read_text())
    opts, data = saved["options"], saved["data"]
    clash = sorted(k for k in given & (set(opts) - RESUMABLE) if getattr(args, k) != opts[k]) + [
        k for k in ("input", "cache", "spacing", "window") if k in given
    ]
    if clash:
        raise SystemExit(
            f"--resume: {', '.join(clash)} cannot change in a resumed run (see {path}); "
            "start a new run in another folder instead"
        )
    for k, v in opts.items():
        # stop_after and progress belong to one invocation; the rest is the run's unless given again.
        if k not in PER_INVOCATION and (k not in given or k not in RESUMABLE):
            setattr(args, k, v)
    args.input, args.cache = data["inputs"], data["cache"]
    args.spacing, args.window = data["spacing"], data["window"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.resume:
        args = _resume_args(args, _explicit(argv), out)
    elif not args.input:
        parser.error("give at least one -i/--input (or --resume an existing run)")
    if len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes one or three values, got {args.spacing}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if args.probe is not None:
        if args.probe_every < 1 or args.probe_cases < 1:
            parser.error(f"--probe-every and --probe-cases must be at least 1, got {args.probe_every}, {args.probe_cases}")
        from ..pretrain.probe import dataset_cases

        try:
            folder, cases, _ = dataset_cases(args.probe)
        except ValueError as e:
            parser.error(str(e))
        if len(cases) < 2:
            parser.error(f"--probe {args.probe}: {folder} has {len(cases)} labeled cases in labelsTr, need at least 2")

    # Heavy imports after argument parsing: --help stays instant.
    from ..data.loader import CropDataset
    from ..data.preprocess import PreprocessSettings, load_fingerprint, preprocess_corpus
    from ..pretrain.distributed import any_rank, init_distributed, shutdown
    from ..pretrain.run import run_pretraining, setup_logging

    dist = init_distributed(args.device)
    setup_logging(out, dist.is_main)
    try:
        spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
        settings = PreprocessSettings(spacing=tuple(spacing), window=tuple(args.window))
        cache = Path(args.cache) if args.cache else out / "cache"
        failed = False
        if dist.is_main and not (args.resume and (cache / "fingerprint.json").is_file()):
            try:
                preprocess_corpus(args.input, cache, settings, args.preprocess_workers, args.progress)
            except (ValueError, RuntimeError) as e:
                log.error("%s", e)
                failed = True
        if any_rank(failed, dist):  # also the barrier: the other ranks wait here for rank 0's cache
            return 2
        if args.preprocess_only:
            log.info("preprocess only: the cache is %s (fingerprint.json, skipped.txt)", cache)
            return 0
        opts = _options(args)
        crops = CropDataset(cache, 2 * PRESETS[args.preset]["input_size"], seed=args.seed)
        data = {"spacing": list(spacing), "window": list(args.window), "inputs": list(args.input),
                "cache": str(cache), "corpus": load_fingerprint(cache)}  # fmt: skip
        result = run_pretraining(out, opts, crops, data, dist, resume=args.resume)
        return 130 if result.status == "interrupted" else 0
    finally:
        shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
