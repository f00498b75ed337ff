"""``mim_nnunet_classify``: case-level disease classification from a MiM checkpoint (train / predict / evaluate).

Argument parsing and one library call per subcommand (:mod:`mim_nnunet.classify`); errors are one line naming the
file and the value. docs/classification.md describes the dataset layout and every option.
"""

from __future__ import annotations

import argparse
import logging
import sys

INTERRUPTED = 130  # exit status of a run stopped by SIGINT/SIGTERM (saved; continue with --resume)

TRAIN_OPTIONS = [
    (("-i", "--input"), dict(dest="dataset", help="dataset folder (nnU-Net raw layout + classesTr.csv) or nnU-Net "
                             "dataset id / name in $nnUNet_raw")),
    (("-pt", "--checkpoint"), dict(dest="checkpoint", help="MiM checkpoint (.safetensors, ours or converted)")),
    (("-o", "--output"), dict(dest="out", required=True, help="run folder")),
    (("--fold",), dict(default="0", help="0-4 (stratified 5-fold splits_final.json) or all (default 0)")),
    (("--from-scratch",), dict(dest="mode", action="store_const", const="scratch", default="finetune",
                               help="the identical network from random initialisation")),
    (("--linear-probe",), dict(dest="mode", action="store_const", const="linear_probe",
                               help="freeze the pre-trained encoder, train the head only")),
    (("--pooling",), dict(default="mean", choices=["mean", "attention"], help="token pooling (default mean)")),
    (("--device",), dict(default="auto", help="cpu, cuda or auto (default)")),
    (("--epochs",), dict(type=int, default=100, help="default 100")),
    (("--lr",), dict(type=float, default=None, help="peak learning rate (default 1e-4; 1e-3 for --linear-probe)")),
    (("--weight-decay",), dict(type=float, default=0.05)),
    (("--layer-decay",), dict(type=float, default=0.75, help="layer-wise LR decay of the encoder (default 0.75)")),
    (("--warmup-fraction",), dict(type=float, default=0.05, help="share of the epochs warming up (default 0.05)")),
    (("--class-weights",), dict(default="none", help="cross-entropy class weights: none, balanced or w1,w2,...")),
    (("--seed",), dict(type=int, default=None, help="fixes every batch (default $MIM_NNUNET_SEED, else 0)")),
    (("--num-workers",), dict(type=int, default=2, help="data-loading processes (default 2)")),
    (("--save-every",), dict(type=int, default=1, help="epochs between checkpoint pairs (default 1)")),
    (("--precision",), dict(default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                            help="auto: bf16 (fp16 without bf16) on CUDA, fp32 on CPU")),
    (("--spacing",), dict(type=float, nargs="+", default=None, help="z y x mm instead of the checkpoint's")),
    (("--window",), dict(type=float, nargs=2, default=None, metavar=("LO", "HI"),
                         help="HU window mapped to [0, 1] instead of the checkpoint's")),
    (("--input-size",), dict(type=int, nargs=3, default=None, help="z y x voxels (multiples of 16) instead of "
                             "the planned")),
    (("--batch-size",), dict(type=int, default=None, help="instead of the planned")),
    (("--memory-target-gib",), dict(type=float, default=8.0, help="GiB a training step may use (default 8)")),
    (("--drop-path",), dict(dest="drop_path_rate", type=float, default=0.1, help="drop-path rate (default 0.1)")),
    (("--allow-non-ct",), dict(action="store_true", help="z-score non-CT channels instead of refusing them")),
    (("--resume",), dict(action="store_true", help="continue the run in -o (requeue-safe)")),
    (("--overwrite",), dict(action="store_true", help="replace a run in -o")),
    (("--no-progress",), dict(dest="progress", action="store_false", help="no progress bars")),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mim_nnunet_classify", description="Case-level classification with a "
                                "MiM encoder: train, predict, evaluate (docs/classification.md).")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="plan from the dataset and the checkpoint, then train a run folder")
    for flags, keywords in TRAIN_OPTIONS:
        t.add_argument(*flags, **keywords)
    pr = sub.add_parser("predict", help="predictions.csv (case, class, p_<class>) of a folder of images")
    pr.add_argument("-m", "--model", dest="runs", action="append", required=True,
                    help="run folder; repeat to average the probabilities of several runs")  # fmt: skip
    pr.add_argument("-i", "--input", dest="images", required=True, help="folder of images (CASE_0000.nii.gz ...)")
    pr.add_argument("-o", "--output", dest="out", required=True, help="predictions.csv")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--checkpoint", default="final", choices=["final", "best", "latest"],
                    help="which checkpoint of each run (default final)")  # fmt: skip
    pr.add_argument("--no-progress", dest="progress", action="store_false")
    ev = sub.add_parser("evaluate", help="metrics.json, confusion.png and roc.png of predictions vs references")
    ev.add_argument("-p", "--predictions", required=True, help="predictions.csv")
    ev.add_argument("-r", "--reference", required=True, help="case,class table (e.g. classesTs.csv)")
    ev.add_argument("-o", "--output", dest="out", required=True, help="metrics.json")
    return p


def explicit(argv: list[str]) -> set[str]:
    """Names of the train options given on the command line (a copy of the parser without defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    for flags, keywords in TRAIN_OPTIONS:
        p.add_argument(*flags, **(keywords | {"default": argparse.SUPPRESS, "required": False}))
    return set(vars(p.parse_known_args(argv)[0]))


def train(args: argparse.Namespace, given: set[str]) -> int:
    from ..classify.train import PlanRequest, TrainOptions, train
    from ..nnunet.trainer import env_seed

    if not args.resume and (args.dataset is None or args.checkpoint is None):
        raise ValueError("train needs -i DATASET and -pt CHECKPOINT (only --resume of an existing run may omit them)")
    seed = args.seed if args.seed is not None else (env_seed() or 0)
    opts = TrainOptions(fold=str(args.fold), epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                        layer_decay=args.layer_decay, warmup_fraction=args.warmup_fraction,
                        class_weights=args.class_weights, seed=seed, num_workers=args.num_workers,
                        save_every=args.save_every, precision=args.precision, device=args.device,
                        progress=args.progress)  # fmt: skip
    request = PlanRequest(mode=args.mode, pooling=args.pooling, spacing=args.spacing, window=args.window,
                          input_size=args.input_size, batch_size=args.batch_size,
                          memory_target_gib=args.memory_target_gib, allow_non_ct=args.allow_non_ct,
                          drop_path_rate=args.drop_path_rate)  # fmt: skip
    how = train(args.dataset, args.checkpoint, args.out, request, opts, args.resume, args.overwrite, given)
    return 0 if how == "finished" else INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "train":  # train logs through the run's own handlers (console and RUN/train.log)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..checkpoint import CheckpointError

    try:
        if args.command == "train":
            return train(args, explicit(argv[1:]))
        if args.command == "predict":
            from ..classify.predict import predict

            predict(args.runs, args.images, args.out, args.device, args.checkpoint, args.progress)
            return 0
        from ..classify.evaluate import evaluate

        m = evaluate(args.predictions, args.reference, args.out)
        auroc = "n/a" if m["auroc_macro"] is None else f"{m['auroc_macro']:.4f}"
        print(f"accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  macro F1 "
              f"{m['f1_macro']:.4f}  macro AUROC {auroc}  ({m['cases']} cases) -> {args.out}")  # fmt: skip
        return 0
    except (ValueError, CheckpointError, OSError) as e:  # DatasetError, PlanError, ResumeError are ValueErrors
        parser.exit(1, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
