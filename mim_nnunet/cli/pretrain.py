"""``mim_nnunet_pretrain``: preprocess an unlabeled CT corpus and pre-train a MiM encoder on it.

Only the command line (MAE's ``main_pretrain``): the options as a table (:data:`OPTIONS`), then one call,
:func:`mim_nnunet.pretrain.command.pretrain_command`, which checks the request, preprocesses, and trains. What
may change on resume, the run folder, the cache and signals are the library's, not this module's.
"""

from __future__ import annotations

import argparse
import sys

from ..model.config import PRESETS
from ..pretrain.resume import RESUMABLE
from ..pretrain.run import RunOptions

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


class DenseExecution(argparse.BooleanOptionalAction):
    """``--dense-execution`` / ``--no-dense-execution`` set ``packed`` (the code's name, the model's) to False / True."""

    def __init__(self, option_strings, dest, help=None, **kwargs):  # noqa: A002 -- argparse's keyword
        super().__init__(option_strings, dest, default=True, **kwargs)
        self.help = help  # without BooleanOptionalAction's "(default: True)", which would read backwards here

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string.startswith("--no-"))


def _flag(dest: str) -> str:
    """The command line's name of option ``dest``."""
    return "--dense-execution" if dest == "packed" else "--" + dest.replace("_", "-")


d = RunOptions()  # the defaults the help texts quote

# fmt: off
OPTIONS: dict[str, list[tuple[tuple[str, ...], dict]]] = {  # group title: [(flags, add_argument keywords)]
    "data": [
        (("-i", "--input"), dict(action="append", default=[], metavar="SPEC", help=
            "unlabeled CT, repeatable: an image file (.nii[.gz], .mha, .nrrd), a folder (searched "
            "recursively; DICOM series folders are one case per series), a glob ('**' allowed), an "
            "nnU-Net raw dataset id or name in $nnUNet_raw (imagesTr + imagesTs, labels ignored), or a "
            "manifest (.txt one spec per line, .json list)")),
        (("-o", "--output"), dict(required=True, metavar="RUN", help=
            "run folder (checkpoints, logs, pictures); created if missing. A folder holding a run is refused "
            "unless --resume or --overwrite")),
        (("--cache",), dict(metavar="DIR", help="preprocessed cache (blosc2); default RUN/cache")),
        (("--spacing",), dict(type=float, nargs="+", default=[1.5], metavar="MM", help=
            "pre-training spacing in mm: one value (isotropic) or three (z y x); default 1.5")),
        (("--window",), dict(type=float, nargs=2, default=[-1000.0, 1000.0], metavar=("LO", "HI"), help=
            "HU window mapped to [0, 1]; default -1000 1000")),
        (("--preprocess-only",), dict(action="store_true", help=
            "preprocess the inputs into the cache and stop")),
        (("--preprocess-workers",), dict(type=NON_NEGATIVE, default=2, metavar="N", help=
            "processes for preprocessing; default 2")),
        (("--allow-no-air",), dict(action="store_true", help=
            "accept volumes without air (CT crops cut inside the body, as many derived datasets ship); by default "
            "a volume whose minimum is above -200 HU is skipped as not CT (MR, [0,1] or [0,255] intensities)")),
        (("--num-workers",), dict(type=NON_NEGATIVE, default=d.num_workers, metavar="N", help=
            f"DataLoader workers per training process (0: load in the main process); default {d.num_workers}")),
    ],
    "model": [
        (("--preset",), dict(choices=sorted(PRESETS), default=d.preset, help=
            f"architecture size: base = the paper's (crops 192^3), small (128^3), tiny (64^3, tests); "
            f"default {d.preset}")),
        (("--levels",), dict(type=int, choices=[1, 2, 3], default=None, help=
            "Mask-in-Mask levels (1 = plain hybrid MAE, the ablation baseline); default 3")),
        (("--grad-checkpointing",), dict(action=argparse.BooleanOptionalAction, default=False, help=
            "recompute activations in backward: less memory, more compute")),
        (("--dense-execution",), dict(action=DenseExecution, dest="packed", help=
            "compute the masked voxels too (the reference execution, same results; about 1.6-2.3x the CPU step "
            "time, docs/benchmarks.md). Default: visible voxels only")),
        (("--align-target",), dict(choices=["online", "ema"], default=d.align_target, help=
            "target of the cross-level alignment: online = the paper's two trained heads (can collapse to one "
            "direction: watch collapse_cos/collapse_std in metrics.jsonl); ema = BYOL-style, the target is a frozen "
            f"EMA copy of the parent head; default {d.align_target}")),
        (("--align-ema",), dict(type=float, default=d.align_ema, metavar="M", help=
            f"EMA momentum per optimizer step of the --align-target ema target; default {d.align_ema}")),
    ],
    "optimisation (mim_method.md section 5)": [
        (("--batch-size",), dict(type=POSITIVE, default=d.batch_size, metavar="N", help=
            f"crops per micro-batch per process; default {d.batch_size}")),
        (("--accumulate",), dict(type=POSITIVE, default=d.accumulate, metavar="K", help=
            "micro-batches per optimizer step (gradient accumulation); effective batch = "
            f"batch size x K x processes; default {d.accumulate}")),
        (("--max-steps",), dict(type=POSITIVE, default=None, metavar="N", help=
            "length of the schedule in optimizer steps (wins over --epochs)")),
        (("--epochs",), dict(type=POSITIVE, default=d.epochs, metavar="N", help=
            f"length of the schedule in epochs (one random crop per volume each); default {d.epochs}")),
        (("--lr",), dict(type=float, default=None, help="absolute peak learning rate (overrides --blr)")),
        (("--blr",), dict(type=float, default=d.blr, help=
            f"base learning rate per 256 crops: lr = blr x effective batch / 256; default {d.blr}")),
        (("--min-lr",), dict(type=float, default=d.min_lr, help=
            f"lr at the end of the cosine; default {d.min_lr}")),
        (("--weight-decay",), dict(type=float, default=d.weight_decay, help=
            f"AdamW weight decay (not on norms, biases, position embeddings, mask token); default "
            f"{d.weight_decay}")),
        (("--warmup-steps",), dict(type=NON_NEGATIVE, default=None, metavar="N", help=
            "linear warm-up steps before the cosine decay; default 5%% of the schedule")),
        (("--clip-grad",), dict(type=float, default=None, metavar="NORM", help=
            "clip the gradient norm (default: no clipping, as the paper)")),
    ],
    "execution": [
        (("--device",), dict(default="auto", help=
            "auto (CUDA if present), cpu, cuda or cuda:N; under torchrun cuda means the local GPU")),
        (("--precision",), dict(choices=["auto", "fp32", "bf16", "fp16"], default=d.precision, help=
            "autocast precision: auto = bf16 on CUDA (fp16 + loss scaling where bf16 is missing) and "
            "fp32 on CPU (bf16 measured slower there: benchmarks/bench_precision.py); default auto")),
        (("--seed",), dict(type=int, default=d.seed, help=
            f"seed of crops, masks and initialisation; default {d.seed}")),
        (("--save-every",), dict(type=POSITIVE, default=d.save_every, metavar="N", help=
            f"checkpoint + previews every N optimizer steps (and at the end); default {d.save_every}")),
        (("--log-every",), dict(type=POSITIVE, default=d.log_every, metavar="N", help=
            f"a line in train.log every N steps; default {d.log_every}")),
        (("--stop-after",), dict(type=POSITIVE, default=None, metavar="N", help=
            "save and leave after N steps of this invocation, the schedule unchanged (continue "
            "with --resume); for time-limited jobs")),
        (("--resume",), dict(action="store_true", help=
            "continue the run in RUN exactly where it stopped, with its config.json; only "
            f"{', '.join(sorted(_flag(o) for o in RESUMABLE - {'progress'}))} "
            "may change (and --device, --preprocess-workers, which are never stored); the others may be repeated "
            "with their stored values (a requeued job's identical command). Without a run in RUN yet (killed "
            "before it started), the run starts")),
        (("--overwrite",), dict(action="store_true", help=
            "start a new run in RUN even if it holds one: its checkpoints, resume state, metrics, log and "
            "pictures are deleted first (a cache inside RUN is kept and reused if the settings match)")),
        (("--no-progress",), dict(dest="progress", action="store_false", help="no tqdm progress bar")),
    ],
    "linear probe (watch the representations without fine-tuning)": [
        (("--probe",), dict(metavar="DATASET", default=None, help=
            "labeled nnU-Net raw dataset (id, name in $nnUNet_raw, or folder with imagesTr + labelsTr): every "
            "--probe-every steps, fit a logistic regression on frozen encoder features of --probe-cases cases and "
            "log its Dice on as many held-out cases (probe_dice in metrics.jsonl and progress.png)")),
        (("--probe-every",), dict(type=POSITIVE, default=d.probe_every, metavar="N", help=
            f"probe every N optimizer steps (and after the first and the last); default {d.probe_every}")),
        (("--probe-cases",), dict(type=POSITIVE, default=d.probe_cases, metavar="K", help=
            f"labeled cases to fit the probe on (the next K are held out to score it); default {d.probe_cases}")),
    ],
}
# fmt: on


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim_nnunet_pretrain", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    for title, options in OPTIONS.items():
        group = p.add_argument_group(title)
        for flags, keywords in options:
            group.add_argument(*flags, **keywords)
    return p


def _explicit(argv: list[str] | None) -> set[str]:
    """Names of the options given on the command line (a copy of the parser that has no defaults)."""
    p = build_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
        a.required = False
    return set(vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..pretrain.command import (  # after parsing: --help stays quick
        CommandError,
        UsageError,
        pretrain_command,
    )

    try:
        return pretrain_command(args, given=_explicit(argv))
    except UsageError as e:
        parser.error(str(e))
    except CommandError as e:
        if e.code == 1:  # SystemExit with the message: Python prints it and exits 1, and callers can read it
            raise SystemExit(f"{parser.prog}: error: {e}") from None
        parser.exit(e.code, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
