"""``mim_nnunet_plan_and_preprocess``: fingerprint (if missing), MiM planner, nnU-Net preprocessing.

Wires arguments to nnU-Net's own API (``plan_and_preprocess_api``); every decision is the planner's
(:mod:`mim_nnunet.nnunet.planner`). Options mirror ``nnUNetv2_plan_and_preprocess`` where they mean the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, read_metadata

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed")


def build_parser() -> argparse.ArgumentParser:
    from ..nnunet.planner import DEFAULT_PLANS_NAME

    p = argparse.ArgumentParser(
        prog="mim_nnunet_plan_and_preprocess",
        description="Plan an nnU-Net dataset for fine-tuning a MiM checkpoint, then run nnU-Net preprocessing. "
        "Needs nnUNet_raw and nnUNet_preprocessed set.",
    )
    p.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    p.add_argument("-pt", required=True, help="MiM pre-training checkpoint (.safetensors)")
    p.add_argument(
        "-c",
        nargs="+",
        default=["3d_fullres"],
        help="configurations to preprocess (MiM plans only 3d_fullres)",
    )
    p.add_argument("-np", type=int, default=2, help="processes for preprocessing (default 2)")
    p.add_argument("-npfp", type=int, default=2, help="processes for fingerprint extraction (default 2)")
    p.add_argument(
        "-plans_name",
        default=DEFAULT_PLANS_NAME,
        help=f"plans identifier (default {DEFAULT_PLANS_NAME}); use it as -p",
    )
    p.add_argument(
        "-gpu_memory_target",
        type=float,
        default=8.0,
        help="GiB the training step may use (default 8, as nnU-Net)",
    )
    p.add_argument(
        "-overwrite_target_spacing",
        nargs=3,
        type=float,
        default=None,
        help="target spacing (z y x mm) instead of the checkpoint's",
    )
    p.add_argument(
        "--allow_non_ct",
        action="store_true",
        help="normalise non-CT channels with nnU-Net's default scheme instead of refusing",
    )
    p.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=None,
        help="HU window mapped to [0, 1] for fine-tuning instead of the checkpoint's pre-training window "
        "(the paper fine-tunes with task windows, e.g. BTCV -175 250)",
    )
    p.add_argument("--clean", action="store_true", help="re-extract the fingerprint even if it exists")
    p.add_argument("--no_pp", action="store_true", help="plan only, no preprocessing")
    p.add_argument("--verify_dataset_integrity", action="store_true")
    p.add_argument("--verbose", action="store_true")
    return p


def resolve_datasets(ids: list[int]) -> dict[int, str] | None:
    """{id: DatasetXXX_Name} with each raw dataset.json's labels checked, before any work; None after printing
    a one-line error (an unknown id, labels or regions nnU-Net would train or export wrongly)."""
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from ..labels import DatasetLabelsError, dataset_labels

    names = {}
    for dataset_id in ids:
        try:
            names[dataset_id] = convert_id_to_dataset_name(dataset_id)
        except RuntimeError as e:
            first = str(e).splitlines()[0].split(". Make sure")[0]
            print(
                f"error: -d {dataset_id}: {first} (looked for Dataset{dataset_id:03d}_* in "
                f"nnUNet_raw={os.environ['nnUNet_raw']} and nnUNet_preprocessed={os.environ['nnUNet_preprocessed']})",
                file=sys.stderr,
            )
            return None
        dataset_json = Path(os.environ["nnUNet_raw"]) / names[dataset_id] / "dataset.json"
        if not dataset_json.is_file():
            continue  # nnU-Net's fingerprint step names the missing file
        try:
            dataset_labels(json.loads(dataset_json.read_text()), str(dataset_json))
        except (ValueError, DatasetLabelsError) as e:
            text = str(e) if isinstance(e, DatasetLabelsError) else f"{dataset_json}: not valid JSON ({e})"
            print(f"error: -d {dataset_id}: {text}", file=sys.stderr)
            return None
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if any(c != "3d_fullres" for c in args.c):
        print(f"error: MiM plans have only the 3d_fullres configuration, got -c {args.c}", file=sys.stderr)
        return 2
    if args.window is not None and not args.window[1] > args.window[0]:
        print(f"error: --window {args.window[0]:g} {args.window[1]:g}: LO must be below HI", file=sys.stderr)
        return 2
    if missing := [v for v in NNUNET_FOLDERS if not os.environ.get(v)]:
        print(
            f"error: {' and '.join(missing)} not set: nnU-Net needs its folders, e.g. "
            + " ".join(f"export {v}=/data/{v}" for v in missing),
            file=sys.stderr,
        )
        return 2
    try:
        read_metadata(args.pt)  # before any work: a missing or edited checkpoint is found at once
    except CheckpointError as e:
        print(f"error: -pt {e}", file=sys.stderr)
        return 2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    from ..nnunet.paths import export_line
    from ..nnunet.planner import MiMPlanner, PlanningError

    names = resolve_datasets(args.d)
    if names is None:
        return 2
    planned = []  # (dataset id, plans name) for the closing hint
    for dataset_id in args.d:
        name = names[dataset_id]
        fingerprint = Path(nnUNet_preprocessed) / name / "dataset_fingerprint.json"
        if args.clean or not fingerprint.is_file():
            extract_fingerprint_dataset(
                dataset_id,
                num_processes=args.npfp,
                check_dataset_integrity=args.verify_dataset_integrity,
                clean=True,
                verbose=args.verbose,
            )
        planner = functools.partial(
            MiMPlanner, checkpoint=args.pt, allow_non_ct=args.allow_non_ct, window=args.window
        )
        try:
            _, plans_name = plan_experiment_dataset(
                dataset_id,
                planner,
                gpu_memory_target_in_gb=args.gpu_memory_target,
                overwrite_target_spacing=args.overwrite_target_spacing,
                overwrite_plans_name=args.plans_name,
            )
        except (CheckpointError, PlanningError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if not args.no_pp:
            preprocess_dataset(
                dataset_id, plans_name, configurations=args.c, num_processes=[args.np], verbose=args.verbose
            )
        print(f"MiM plans written: {Path(nnUNet_preprocessed) / name / (plans_name + '.json')}")
        planned.append((dataset_id, plans_name))
    print(f"Train with (FOLD 0-4, or all), after: {export_line()}")
    for dataset_id, plans_name in planned:
        print(f"    nnUNetv2_train {dataset_id} 3d_fullres FOLD -tr nnUNetTrainerMiM -p {plans_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
