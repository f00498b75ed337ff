"""The submission run end to end: predict -> convert to the profile -> validate -> zip + manifest.

Owns the order of the steps and the output folder layout; each step lives in its own module. Nothing is zipped
unless every case validates.

Output folder::

    OUT/predictions/      the files as the challenge wants them (profile naming, folder layout, labels, dtype)
    OUT/submission.zip    exactly the files under predictions/ (written only when validation passed)
    OUT/manifest.json     per-file sha256, models, post-processing, package versions, command line
    OUT/validation.json   the per-case validation report (also on failure)
    OUT/nnunet/           nnU-Net's raw outputs (per model, ensemble, post-processed)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .package import build_manifest, convert_prediction, sha256_file, write_manifest, write_zip
from .predict import InferenceSetup, resolve_models, run_inference
from .profiles import Case, Profile, ProfileError, model_variables
from .validate import ValidationReport, validate_predictions

log = logging.getLogger(__name__)

PREDICTIONS, ZIP, MANIFEST, VALIDATION, WORK = (
    "predictions",
    "submission.zip",
    "manifest.json",
    "validation.json",
    "nnunet",
)


class OutputExistsError(FileExistsError):
    pass


@dataclass
class SubmitResult:
    report: ValidationReport
    out_dir: Path
    zip_path: Path | None
    manifest_path: Path | None

    @property
    def ok(self) -> bool:
        return self.report.ok


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    ours = [out_dir / n for n in (PREDICTIONS, ZIP, MANIFEST, VALIDATION, WORK)]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a submission ({', '.join(p.name for p in present)}); pass --overwrite"
        )
    for p in present:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def check_distinct_outputs(relpaths: dict[str, str], profile: Profile) -> None:
    seen: dict[str, str] = {}
    for case_id, rel in relpaths.items():
        if rel in seen:
            raise ProfileError(
                f"profile '{profile.name}': cases {seen[rel]} and {case_id} would both be written to {rel}"
            )
        seen[rel] = case_id


def template_variables(setup: InferenceSetup | None, user_vars: dict[str, str] | None) -> dict[str, str]:
    variables = model_variables(setup.dataset_name) if setup is not None else {}
    variables.update(user_vars or {})
    return variables


def submit(
    images_dir: str | Path,
    model_args: list[str],
    profile: Profile,
    out_dir: str | Path,
    *,
    folds: list[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    postprocessing: str | None = None,
    device: str = "cpu",
    tta: bool = True,
    step_size: float = 0.5,
    num_processes: int = 2,
    label_map: dict[int, int] | None = None,
    map_labels_by_name: bool = False,
    user_vars: dict[str, str] | None = None,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> SubmitResult:
    out_dir = Path(out_dir)
    cases = profile.collect_cases(images_dir)
    setup = resolve_models(model_args, folds, checkpoint, postprocessing)
    for note in setup.notes:
        log.warning(note)
    variables = template_variables(setup, user_vars)
    if map_labels_by_name:
        explicit = label_map or {}
        label_map = {**profile.label_map_by_name(setup.dataset_json["labels"], set(explicit)), **explicit}
    # Resolve every output name before predicting: a template error must not cost an inference run.
    relpaths = {c.case_id: profile.output_relpath(c, variables) for c in cases}
    check_distinct_outputs(relpaths, profile)
    prepare_output(out_dir, overwrite)

    final = run_inference(setup, cases, out_dir / WORK, device, tta, step_size, num_processes)
    ending = setup.dataset_json["file_ending"]
    pred_root = out_dir / PREDICTIONS
    for c in cases:
        src = final / f"{c.case_id}{ending}"
        if src.is_file():  # a case nnU-Net did not write is reported by validation as missing
            convert_prediction(src, pred_root / relpaths[c.case_id], profile, label_map)

    allowed = _allowed_after_map(profile, setup.dataset_json.get("labels"), label_map)
    report = validate_predictions(pred_root, cases, profile, allowed, variables)
    report.write(out_dir / VALIDATION)
    if not report.ok:
        return SubmitResult(report, out_dir, None, None)

    zip_path = out_dir / ZIP
    write_zip(pred_root, zip_path)
    file_cases = {relpaths[c.case_id]: _case_entry(c) for c in cases}
    manifest = build_manifest(
        pred_root,
        profile,
        file_cases,
        models=[m.identity() for m in setup.models],
        postprocessing=_pp_entry(setup),
        zip_path=zip_path,
        validation={"ok": True, "n_cases": len(cases), "allowed_labels": report.allowed_labels},
        argv=argv,
        extra={
            "inference": {
                "source": setup.source,
                "device": device,
                "tta": tta,
                "step_size": step_size,
                "label_map": {str(k): v for k, v in {**profile.label_map, **(label_map or {})}.items()},
                "variables": variables,
            }
        },
    )
    write_manifest(manifest, out_dir / MANIFEST)
    return SubmitResult(report, out_dir, zip_path, out_dir / MANIFEST)


def _allowed_after_map(
    profile: Profile, model_labels: dict | None, label_map: dict[int, int] | None
) -> set[int]:
    if profile.labels is not None or not label_map:
        return profile.allowed_labels(model_labels)
    merged = dataclasses.replace(profile, label_map={**profile.label_map, **label_map})
    return merged.allowed_labels(model_labels)


def _case_entry(case: Case) -> dict:
    return {"case": case.case_id, "images": [p.name for p in case.images]}


def _pp_entry(setup: InferenceSetup) -> dict | None:
    if setup.postprocessing is None:
        return None
    return {"file": str(setup.postprocessing), "sha256": sha256_file(setup.postprocessing)}


def check_only(
    predictions_dir: str | Path,
    images_dir: str | Path,
    profile: Profile,
    *,
    model_args: list[str] | None = None,
    labels: list[int] | None = None,
    label_map: dict[int, int] | None = None,
    user_vars: dict[str, str] | None = None,
) -> ValidationReport:
    """Validate an existing predictions folder (the profile's layout under it) against the test images."""
    cases = profile.collect_cases(images_dir)
    setup = resolve_models(model_args, postprocessing="none") if model_args else None
    variables = template_variables(setup, user_vars)
    if labels is not None:
        allowed = set(labels)
    else:
        allowed = _allowed_after_map(profile, setup.dataset_json.get("labels") if setup else None, label_map)
    return validate_predictions(predictions_dir, cases, profile, allowed, variables)
