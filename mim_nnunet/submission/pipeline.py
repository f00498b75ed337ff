"""The submission run end to end: predict -> convert to the profile -> validate -> zip + manifest.

Owns the order of the steps and the output folder layout; each step lives in its own module. Nothing is zipped
unless every case validates. A run works in a staging folder inside OUT and is installed only when complete, so
an earlier submission survives a crash or a failed validation of the new run (``--overwrite``).

Output folder::

    OUT/predictions/      the files as the challenge wants them (profile naming, folder layout, labels, dtype)
    OUT/submission.zip    exactly the files under predictions/, under the profile's zip_root (AMOS22: results/)
    OUT/manifest.json     per-file sha256, models, post-processing, package versions, command line
    OUT/validation.json   the per-case validation report (also on failure)
    OUT/nnunet/           nnU-Net's raw outputs (per model, ensemble, post-processed)
    OUT/failed_run/       a later run that failed validation while an earlier submission was kept
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
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


FAILED_RUN = "failed_run"
OURS = (PREDICTIONS, ZIP, MANIFEST, VALIDATION, WORK)


@dataclass
class SubmitResult:
    report: ValidationReport
    out_dir: Path
    zip_path: Path | None
    manifest_path: Path | None

    @property
    def ok(self) -> bool:
        return self.report.ok


def existing_submission(out_dir: Path) -> list[Path]:
    return [out_dir / n for n in OURS if (out_dir / n).exists()]


def prepare_output(out_dir: Path, overwrite: bool) -> bool:
    """Check that ``out_dir`` may receive a submission; True when an earlier one is there (kept for now)."""
    present = existing_submission(out_dir)
    if present and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a submission ({', '.join(p.name for p in present)}); pass --overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return bool(present)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def install_run(stage: Path, out_dir: Path) -> None:
    """Replace the submission in ``out_dir`` by the complete one in ``stage`` (both on one file system).

    The old files are first moved aside, then the new ones renamed in, then the old ones deleted: at no point is
    ``out_dir`` left without one complete submission or the other."""
    backup = Path(tempfile.mkdtemp(prefix=".mim_submit_old_", dir=out_dir))
    try:
        for name in (*OURS, FAILED_RUN):
            if (out_dir / name).exists():
                os.replace(out_dir / name, backup / name)
        for name in OURS:
            if (stage / name).exists():
                os.replace(stage / name, out_dir / name)
    except BaseException:
        for name in (*OURS, FAILED_RUN):  # put the old submission back
            if (backup / name).exists():
                if (out_dir / name).exists():
                    _remove(out_dir / name)
                os.replace(backup / name, out_dir / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


def check_distinct_outputs(relpaths: dict[str, str], profile: Profile) -> None:
    seen: dict[str, str] = {}
    for case_id, rel in relpaths.items():
        if rel in seen:
            raise ProfileError(
                f"profile '{profile.name}': cases {seen[rel]} and {case_id} would both be written to {rel}"
            )
        seen[rel] = case_id


def check_model_labels(profile: Profile, setup: InferenceSetup, label_map: dict[int, int] | None) -> None:
    """Each model's values must mean the profile's labels (plain labels vs regions, profiles.py); before any
    prediction, so that a mismatch costs no inference run and writes nothing."""
    for model in setup.models:
        profile.check_model_labels(model.dataset_json, set(label_map or {}), str(model.folder / "dataset.json"))


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
    """Run a whole submission into a staging folder inside ``out_dir``, then install it.

    An earlier submission in ``out_dir`` (``--overwrite``) stays untouched until the new run has validated and
    zipped; if the new run fails validation its files go to ``out_dir/failed_run/`` and the earlier submission
    stays. Without an earlier submission a failed run's files (validation.json, predictions/) land in ``out_dir``.
    """
    out_dir = Path(out_dir)
    setup = resolve_models(model_args, folds, checkpoint, postprocessing)
    if not map_labels_by_name:  # (that map pairs the names itself, or fails)
        check_model_labels(profile, setup, label_map)
    for note in setup.notes:
        log.warning(note)
    cases = profile.collect_cases(images_dir, n_channels=len(setup.dataset_json["channel_names"]))
    variables = template_variables(setup, user_vars)
    if map_labels_by_name:
        explicit = label_map or {}
        label_map = {**profile.label_map_by_name(setup.dataset_json, set(explicit)), **explicit}
    # Resolve every output name before predicting: a template error must not cost an inference run.
    relpaths = {c.case_id: profile.output_relpath(c, variables) for c in cases}
    check_distinct_outputs(relpaths, profile)
    had_submission = prepare_output(out_dir, overwrite)

    stage = Path(tempfile.mkdtemp(prefix=".mim_submit_run_", dir=out_dir))
    try:
        report, ok = _run(
            stage,
            setup,
            cases,
            relpaths,
            profile,
            variables,
            label_map,
            device,
            tta,
            step_size,
            num_processes,
            argv,
        )
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if ok or not had_submission:
        install_run(stage, out_dir)
        final = out_dir
    else:
        _remove(out_dir / FAILED_RUN)
        os.replace(stage, out_dir / FAILED_RUN)
        final = out_dir / FAILED_RUN
        log.warning("the new run failed validation; the earlier submission in %s is kept", out_dir)
    return SubmitResult(report, final, final / ZIP if ok else None, final / MANIFEST if ok else None)


def _run(
    stage, setup, cases, relpaths, profile, variables, label_map, device, tta, step_size, num_processes, argv
) -> tuple[ValidationReport, bool]:
    final = run_inference(setup, cases, stage / WORK, device, tta, step_size, num_processes)
    ending = setup.dataset_json["file_ending"]
    pred_root = stage / PREDICTIONS
    pred_root.mkdir()
    for c in cases:
        src = final / f"{c.case_id}{ending}"
        if src.is_file():  # a case nnU-Net did not write is reported by validation as missing
            convert_prediction(src, pred_root / relpaths[c.case_id], profile, label_map)

    allowed = _allowed_after_map(profile, setup.dataset_json, label_map)
    report = validate_predictions(pred_root, cases, profile, allowed, variables)
    report.write(stage / VALIDATION)
    if not report.ok:
        return report, False

    zip_path = stage / ZIP
    write_zip(pred_root, zip_path, profile.zip_root)
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
    write_manifest(manifest, stage / MANIFEST)
    return report, True


def _allowed_after_map(
    profile: Profile, model_dataset: dict | None, label_map: dict[int, int] | None
) -> set[int]:
    if profile.labels is not None or not label_map:
        return profile.allowed_labels(model_dataset)
    merged = dataclasses.replace(profile, label_map={**profile.label_map, **label_map})
    return merged.allowed_labels(model_dataset)


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
    setup = resolve_models(model_args, postprocessing="none") if model_args else None
    if setup is not None and labels is None:
        check_model_labels(profile, setup, label_map)
    n_channels = len(setup.dataset_json["channel_names"]) if setup else None
    cases = profile.collect_cases(images_dir, n_channels=n_channels)
    variables = template_variables(setup, user_vars)
    if labels is not None:
        allowed = set(labels)
    else:
        allowed = _allowed_after_map(profile, setup.dataset_json if setup else None, label_map)
    return validate_predictions(predictions_dir, cases, profile, allowed, variables)
