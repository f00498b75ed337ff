"""``mim_nnunet_submit``: predictions -> a validated challenge submission; ``--check-only``; ``evaluate``.

    mim_nnunet_submit -i IMAGES -m MODEL [-m MODEL2 ...] --profile msd -o OUT [--device cpu|cuda]
    mim_nnunet_submit -i IMAGES --profile kits23 --check-only PRED_DIR [-m MODEL | --labels 0,1,2,3]
    mim_nnunet_submit evaluate -p PRED_DIR -r REF_DIR --profile kits23 [-o summary.json]
    mim_nnunet_submit evaluate -p PRED_DIR -r REF_DIR --tolerance 2 [--labels 1,2+3] [--empty one] [--dataset-json F]
    mim_nnunet_submit evaluate -p PRED_DIR -r REF_DIR --profile kits23 --lesions tumor [--lesion-iou 0.5]
    mim_nnunet_submit profiles

Exit codes: 0 valid / done, 1 validation failed (nothing zipped), 2 bad arguments, profile or model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from mim_nnunet.labels import DatasetLabels, DatasetLabelsError, dataset_labels
from mim_nnunet.submission.evaluate import evaluate_folders, format_table, label_names, save_result
from mim_nnunet.submission.lesions import LesionSpec
from mim_nnunet.submission.pipeline import OutputExistsError, check_only, submit
from mim_nnunet.submission.predict import ModelError
from mim_nnunet.submission.profiles import Profile, ProfileError, available_profiles, load_profile

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

TRUST = (
    "Only use model folders and post-processing files you trust: loading a model runs nnU-Net's "
    "torch.load(..., weights_only=False) on each checkpoint and unpickles postprocessing.pkl, and unpickling can "
    "execute arbitrary code."
)


def _profile_names() -> str:
    return ", ".join(sorted(available_profiles()))


def _target_list(text: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items or not all(re.fullmatch(r"\d+(\+\d+)*", v) for v in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated labels or '+'-joined regions (e.g. 1,2+3), got {text!r}"
        )
    return items


def _name_list(text: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated target names or keys, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _label_map(text: str) -> dict[int, int]:
    try:
        return {int(a): int(b) for a, b in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SRC:DST[,SRC:DST...], got {text!r}") from None


def _var(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim_nnunet_submit",
        description="Predict test images with trained nnU-Net model(s) and package a validated challenge "
        "submission (predictions in the profile's format, a zip, a manifest). Subcommands: "
        "'evaluate' (Dice + NSD against references, as a challenge scores them), 'profiles' (list the shipped "
        "profiles with their sources and rules). " + TRUST,
    )
    p.add_argument("-i", "--images", required=True, help="folder of test images")
    p.add_argument(
        "-m",
        "--model",
        action="append",
        default=[],
        help="trained model folder (Trainer__Plans__config), repeat to ensemble; or "
        "inference_information.json / the results folder of nnUNetv2_find_best_configuration. "
        "Trusted folders only: their checkpoints are loaded with torch.load(weights_only=False)",
    )
    p.add_argument(
        "--profile",
        default="generic",
        help=f"profile name ({_profile_names()}; details: 'mim_nnunet_submit profiles') or a profile .json file",
    )
    p.add_argument("-o", "--output", help="output folder (predictions/, submission.zip, manifest.json)")
    p.add_argument(
        "--check-only",
        metavar="PRED_DIR",
        help="only validate an existing predictions folder; predicts and writes nothing",
    )
    p.add_argument("-f", "--folds", nargs="+", help="folds to use (default: every fold with a checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument(
        "--postprocessing",
        help="postprocessing.pkl to apply, or 'none' (default: nnU-Net's "
        "determined post-processing when find_best_configuration produced one). It is unpickled: trusted files only",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument(
        "--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch"
    )
    p.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=2,
        help="nnU-Net pre-processing/export workers; 0 = sequential, no worker processes",
    )
    p.add_argument("--labels", type=_int_list, help="allowed label values for --check-only without a model")
    p.add_argument("--label-map", type=_label_map, help="model value -> challenge value, e.g. 1:6,2:3")
    p.add_argument(
        "--map-labels-by-name",
        action="store_true",
        help="map the model's labels to the profile's by name (dataset.json names vs profile names); "
        "--label-map entries take precedence",
    )
    p.add_argument(
        "--var",
        type=_var,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="template variable for the profile's names (e.g. msd_task=Task04_Hippocampus)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier submission in -o once the new one has validated (it is kept until then, and "
        "kept if the new run fails; the failed run goes to -o/failed_run/)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim_nnunet_submit evaluate",
        description="Dice and normalised surface Dice (DeepMind's surface-distance library, as KiTS23 and FLARE "
        "use it) per target and mean; with --lesions also lesion-wise scores. Files are matched by relative path. "
        "With --profile the challenge's targets (labels or regions), per-target tolerances and empty-mask rules "
        "apply.",
    )
    p.add_argument("-p", "--pred", required=True, help="predictions folder")
    p.add_argument("-r", "--ref", required=True, help="reference segmentations folder")
    p.add_argument(
        "--profile",
        help=f"score as this challenge does ({', '.join(n for n in sorted(available_profiles()))} or a .json); "
        "profiles without an evaluation block only give the labels",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="NSD tolerance in mm for every target (required without a profile that has per-target tolerances; "
        "overrides them with one)",
    )
    p.add_argument(
        "--labels",
        type=_target_list,
        help="targets to score: labels and '+'-joined regions, e.g. 1,2+3 (default: the profile's targets, else "
        "the non-zero values in the references)",
    )
    p.add_argument(
        "--empty",
        choices=["nan", "one"],
        help="both masks empty: 'one' scores 1 (KiTS23, FLARE), 'nan' leaves the case out of the mean "
        "(nnU-Net); default: the profile's, else nan",
    )
    p.add_argument(
        "--dataset-json",
        help="nnU-Net dataset.json whose label names name the targets (default: the profile's label names, else "
        "PRED_DIR/dataset.json as nnUNetv2_predict writes it, else the dataset.json beside REF_DIR; targets "
        "without a name are shown by their values)",
    )
    p.add_argument(
        "--lesions",
        type=_name_list,
        metavar="TARGETS",
        help="also score these targets lesion-wise (names, aliases or keys of scored targets, e.g. tumor or 2): "
        "reference and predicted lesions (connected components) per case, detection sensitivity and false "
        "positives at --lesion-iou, lesion-wise Dice; empty masks follow --empty / the profile",
    )
    p.add_argument(
        "--lesion-iou",
        type=float,
        metavar="T",
        help="IoU at which a predicted lesion detects a reference lesion, one-to-one (default 0.5)",
    )
    p.add_argument(
        "--lesion-connectivity",
        type=int,
        choices=[4, 6, 8, 18, 26],
        help="neighbours that join voxels into one lesion (default: full, 26 in 3D, 8 in 2D)",
    )
    p.add_argument("--allow-missing", action="store_true", help="skip references without a prediction")
    p.add_argument("-o", "--output", help="write the full result as JSON")
    return p


def _read_dataset_labels(path: Path) -> DatasetLabels:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    labels = content.get("labels") if isinstance(content, dict) else None
    if not isinstance(labels, dict):
        raise ValueError(
            f"{path}: expected a dataset.json with a 'labels' object ({{name: value}}), got a "
            f"{type(content).__name__}" + (f" with keys {sorted(content)[:8]}" if isinstance(content, dict) else "")
        )
    return dataset_labels(content, str(path))  # regions nnU-Net would export wrongly: DatasetLabelsError


def _dataset_labels_for(args: argparse.Namespace) -> tuple[DatasetLabels | None, Path | None]:
    """The dataset.json of the evaluation: --dataset-json, else the one nnUNetv2_predict leaves in PRED_DIR, else
    the one beside REF_DIR (nnU-Net's raw layout). Unreadable found files are skipped with a warning; labels or
    regions nnU-Net would export wrongly are an error (DatasetLabelsError)."""
    if args.dataset_json:
        return _read_dataset_labels(Path(args.dataset_json)), Path(args.dataset_json)
    for found in (Path(args.pred) / "dataset.json", Path(args.ref).resolve().parent / "dataset.json"):
        if found.is_file():
            try:
                return _read_dataset_labels(found), found
            except DatasetLabelsError:
                raise
            except ValueError as e:
                print(f"warning: {e}; its label names and values are not used", file=sys.stderr)
    return None, None


def _label_source(
    args: argparse.Namespace, profile: Profile | None
) -> tuple[dict[tuple[int, ...], str], str | None, set[int] | None, str]:
    """{values: name} for the evaluation table and where they came from (None: no names known), and the label
    values the files may hold with their source (None: not checked).

    Names: --dataset-json, else the profile's labels, else a found dataset.json. Values: the dataset.json's only
    (its ``ignore`` label included): a challenge scores its targets and reads other values as background, so a
    profile's labels alone check nothing."""
    labels, path = _dataset_labels_for(args)
    values = None
    if labels is not None:
        values = set(labels.values) | ({labels.ignore} if labels.ignore is not None else set())
    if labels is not None and (args.dataset_json or not (profile is not None and profile.labels)):
        names = label_names(labels.regions if labels.has_regions else labels.written)
        return names, str(path), values, str(path)
    if profile is not None and profile.labels:
        return label_names(profile.labels), f"profile {profile.name}", values, str(path)
    return {}, None, None, ""


def _run_evaluate(argv: list[str]) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile) if args.profile else None
        spec = profile.evaluation if profile else None
        if args.profile and spec is None and args.tolerance is None:
            raise ProfileError(f"profile {args.profile!r} has no evaluation block: pass --tolerance MM")
        names, names_from, values, values_from = _label_source(args, profile)
        lesions = None
        if args.lesions:
            iou = 0.5 if args.lesion_iou is None else args.lesion_iou
            lesions = LesionSpec(tuple(args.lesions), iou, args.lesion_connectivity)
        elif args.lesion_iou is not None or args.lesion_connectivity is not None:
            raise ValueError("--lesion-iou and --lesion-connectivity need --lesions TARGETS")
        result = evaluate_folders(
            args.pred, args.ref, args.tolerance, args.labels, args.allow_missing, spec=spec, empty=args.empty,
            names=names, lesions=lesions, label_values=values, label_values_from=values_from,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(result))
    if names_from is not None:
        print(f"(label names from {names_from})")
    if args.output:
        save_result(result, args.output)
    return EXIT_OK


def _run_profiles() -> int:
    for name, path in sorted(available_profiles().items()):
        prof = load_profile(path)
        labels = "from the model" if prof.labels is None else f"{len(prof.labels)} values"
        print(f"{name} - {prof.title}  [labels: {labels}]")
        print(f"    file: {path}")
        print(f"    source: {prof.source}")
        if prof.evaluation is not None:
            tols = ", ".join(
                f"{t.name} {t.tolerance_mm:g}" if t.tolerance_mm is not None else f"{t.name} (--tolerance)"
                for t in prof.evaluation.targets
            )
            print(f"    scoring: empty={prof.evaluation.empty}, NSD tolerances mm: {tols}")
        if prof.container is not None:
            print(f"    container: {prof.container.command}")
        for rule in prof.rules:
            print(f"    rule: {rule}")
    print(TRUST)
    return EXIT_OK


def submit_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`mim_nnunet.submission.pipeline.submit` that ``args`` (of
    :func:`submit_parser`) gives, besides images, models, profile and output; the container entry uses it too."""
    return {
        "folds": args.folds,
        "checkpoint": args.checkpoint,
        "postprocessing": args.postprocessing,
        "device": args.device,
        "tta": not args.disable_tta,
        "step_size": args.step_size,
        "num_processes": args.num_processes,
        "label_map": args.label_map,
        "map_labels_by_name": args.map_labels_by_name,
        "user_vars": dict(args.var),
        "overwrite": args.overwrite,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        return _run_evaluate(argv[1:])
    if argv[:1] == ["profiles"]:
        return _run_profiles()
    parser = submit_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    user_vars = dict(args.var)
    try:
        profile = load_profile(args.profile)
        if args.check_only:
            report = check_only(
                args.check_only,
                args.images,
                profile,
                model_args=args.model or None,
                labels=args.labels,
                label_map=args.label_map,
                user_vars=user_vars,
            )
            print(report.summary())
            return EXIT_OK if report.ok else EXIT_INVALID
        if not args.model or not args.output:
            parser.error("-m/--model and -o/--output are required unless --check-only is given")
        result = submit(
            args.images,
            args.model,
            profile,
            args.output,
            **submit_options(args),
            argv=["mim_nnunet_submit", *argv],
        )
    except (ProfileError, ModelError, OutputExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(result.report.summary())
    if not result.ok:
        print(f"nothing zipped; report: {result.out_dir / 'validation.json'}", file=sys.stderr)
        return EXIT_INVALID
    print(f"wrote {result.zip_path} and {result.manifest_path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
