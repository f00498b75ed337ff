"""``mim_nnunet_phantoms``: write the embedded synthetic CT data (an unlabeled corpus, a labeled nnU-Net dataset
or a case-level classification dataset in the nnU-Net raw layout)."""

from __future__ import annotations

import argparse
import logging

from ..data.phantoms import (
    CLASSIFICATION_TASKS,
    FIELDS,
    TASKS,
    write_classification_dataset,
    write_nnunet_dataset,
    write_unlabeled_corpus,
)

#: every task ``dataset --task`` writes: segmentation (labelsTr) and classification (classesTr.csv)
ALL_TASKS = {**TASKS, **CLASSIFICATION_TASKS}


def _labels(labels: dict) -> str:
    return ", ".join(f"{k} {'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in labels.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim_nnunet_phantoms",
        description="Generate synthetic CT phantoms (int16 HU NIfTI, varied spacing, size and orientation), "
        "deterministic from a seed.",
    )
    geometry = argparse.ArgumentParser(add_help=False)
    geometry.add_argument(
        "--size-mm",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="physical extent of every volume in mm (default: drawn per case in 100..160 mm per axis)",
    )
    geometry.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("I", "J", "K"),
        default=None,
        help="voxel spacing in mm along the image axes i, j, k (default: drawn per case, in-plane 0.7-1.0 mm, "
        "slices 1.0-3.0 mm)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "corpus", parents=[geometry], help="unlabeled pre-training corpus: DIR/phantom_XXXX.nii.gz"
    )
    c.add_argument("-o", "--out", required=True, help="output folder (created if missing)")
    c.add_argument("-n", "--num", type=int, default=16, help="number of volumes (default 16)")
    c.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    c.add_argument(
        "--field",
        choices=list(FIELDS),
        default="abdomen",
        help="abdomen (default: the organ phantoms) or chest: chest phantoms whose lungs are normal or diseased in "
        "the cc-ccii dataset's proportions, the disease not recorded (an unlabeled corpus for pre-training a "
        "classifier, docs/classification.md)",
    )
    _dataset_parser(sub, geometry)
    return p


def _dataset_parser(sub, geometry: argparse.ArgumentParser) -> None:
    d = sub.add_parser(
        "dataset",
        parents=[geometry],
        help="nnU-Net v2 raw dataset RAW/DatasetXXX_NAME: organs, a tumour task (docs/tumours.md) or the "
        "chest classification task (docs/classification.md)",
    )
    d.add_argument("--raw", required=True, help="nnU-Net raw root, usually $nnUNet_raw")
    d.add_argument(
        "--task",
        choices=list(ALL_TASKS),
        default="organs",
        help="organs (default): "
        + _labels(TASKS["organs"].labels)
        + "; kits: KiTS23's values and regions ("
        + _labels(TASKS["kits"].labels)
        + "); liver-tumour: as MSD Task03 ("
        + _labels(TASKS["liver-tumour"].labels)
        + "). A tumour task leaves a quarter of the cases without lesion. cc-ccii: chest phantoms, one class "
        "per case as CC-CCII ("
        + ", ".join(CLASSIFICATION_TASKS["cc-ccii"].classes)
        + ", balanced), in classesTr.csv / classesTs.csv instead of labelsTr / labelsTs",
    )
    d.add_argument(
        "--id",
        type=int,
        default=None,
        help="dataset id 1..999 (default: the task's, "
        + ", ".join(f"{k} {t.dataset_id}" for k, t in ALL_TASKS.items())
        + ")",
    )
    d.add_argument(
        "--name",
        default=None,
        help="dataset name (default: the task's, "
        + ", ".join(f"{k} {t.name}" for k, t in ALL_TASKS.items())
        + ")",
    )
    d.add_argument("--train", type=int, default=8, help="training cases, imagesTr (default 8)")
    d.add_argument("--test", type=int, default=2, help="test cases, imagesTs (default 2)")
    d.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    log = logging.getLogger("mim_nnunet.phantoms")
    if args.command == "corpus":
        paths = write_unlabeled_corpus(
            args.out, args.num, seed=args.seed, shape_mm=args.size_mm, spacing=args.spacing, field=args.field
        )
        log.info("wrote %d phantoms to %s", len(paths), args.out)
    else:
        write = write_classification_dataset if args.task in CLASSIFICATION_TASKS else write_nnunet_dataset
        folder = write(
            args.raw,
            args.id,
            args.name,
            args.train,
            args.test,
            seed=args.seed,
            shape_mm=args.size_mm,
            spacing=args.spacing,
            task=args.task,
        )
        log.info(
            "wrote nnU-Net dataset %s (task %s: %d training, %d test cases)",
            folder,
            args.task,
            args.train,
            args.test,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
