"""Inference for a submission through nnU-Net's own machinery: predictor, ensembling, determined post-processing.

Owns resolving what the user passed as ``-m`` (a trained model folder, or the output of
``nnUNetv2_find_best_configuration``) into model folders, folds and a post-processing file, and running them.
Everything numeric is nnU-Net's: ``nnUNetPredictor`` (sliding window, TTA, export with the input's geometry),
``ensemble_folders`` (probability averaging) and ``apply_postprocessing_to_folder``. No pre-training code here:
a MiM-fine-tuned model is an ordinary nnU-Net model folder whose trainer nnU-Net finds via ``nnUNet_extTrainer``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..labels import DatasetLabelsError, dataset_labels
from .package import sha256_file
from .profiles import Case

log = logging.getLogger(__name__)

INFERENCE_INFO = "inference_information.json"


class ModelError(ValueError):
    """A model folder or find_best_configuration output is incomplete or inconsistent."""


@dataclass
class ModelSpec:
    """One trained nnU-Net model folder (``Trainer__Plans__configuration``) and the folds to use."""

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str = "checkpoint_final.pth"

    @property
    def dataset_json(self) -> dict:
        return json.loads((self.folder / "dataset.json").read_text())

    @property
    def plans(self) -> dict:
        return json.loads((self.folder / "plans.json").read_text())

    def checkpoint_path(self, fold) -> Path:
        return self.folder / f"fold_{fold}" / self.checkpoint

    def identity(self) -> dict:
        """What the manifest records: names from the folder, hashes of plans and every checkpoint used."""
        parts = self.folder.name.split("__")
        trainer, plans_name, configuration = parts if len(parts) == 3 else (None, None, None)
        return {
            "folder": str(self.folder),
            "dataset": self.plans.get("dataset_name"),
            "trainer": trainer,
            "plans": plans_name,
            "configuration": configuration,
            "folds": list(self.folds),
            "checkpoint": self.checkpoint,
            "plans_sha256": sha256_file(self.folder / "plans.json"),
            "dataset_json_sha256": sha256_file(self.folder / "dataset.json"),
            "checkpoint_sha256": {str(f): sha256_file(self.checkpoint_path(f)) for f in self.folds},
        }


@dataclass
class InferenceSetup:
    models: list[ModelSpec]
    postprocessing: Path | None = None
    source: str = "model folders"
    notes: list[str] = field(default_factory=list)

    @property
    def dataset_json(self) -> dict:
        return self.models[0].dataset_json

    @property
    def dataset_name(self) -> str:
        return self.models[0].plans.get("dataset_name", "")


def detect_folds(folder: Path, checkpoint: str) -> tuple[int | str, ...]:
    """fold_0..fold_4 with a checkpoint; ``('all',)`` when only fold_all has one (nnU-Net skips fold_all)."""
    numbered = sorted(
        int(m.group(1))
        for p in folder.glob("fold_*")
        if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / checkpoint).is_file()
    )
    if numbered:
        return tuple(numbered)
    if (folder / "fold_all" / checkpoint).is_file():
        return ("all",)
    raise ModelError(f"{folder}: no fold_*/{checkpoint} found")


def _check_model_folder(folder: Path, folds, checkpoint: str) -> ModelSpec:
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder}: not an nnU-Net model folder (missing {name})")
    try:  # labels or regions nnU-Net would export wrongly are refused before any inference
        dataset_labels(json.loads((folder / "dataset.json").read_text()), str(folder / "dataset.json"))
    except ValueError as e:
        raise ModelError(str(e) if isinstance(e, DatasetLabelsError) else f"{folder / 'dataset.json'}: {e}") from None
    folds = tuple(folds) if folds else detect_folds(folder, checkpoint)
    folds = tuple(f if f == "all" else int(f) for f in folds)
    spec = ModelSpec(folder, folds, checkpoint)
    for f in folds:
        if not spec.checkpoint_path(f).is_file():
            raise ModelError(f"{folder}: fold {f} has no {checkpoint}")
    return spec


def _relocate(path: Path, dataset_dir: Path) -> Path:
    # find_best_configuration stores absolute paths; results folders get moved. Re-anchor on the dataset folder.
    if path.is_file():
        return path
    parts = path.parts
    if dataset_dir.name in parts:
        i = len(parts) - 1 - parts[::-1].index(dataset_dir.name)
        candidate = dataset_dir.joinpath(*parts[i + 1 :])
        if candidate.is_file():
            return candidate
    return path


def from_inference_information(info_file: Path, checkpoint: str) -> InferenceSetup:
    """The models, folds and post-processing that ``nnUNetv2_find_best_configuration`` selected."""
    info = json.loads(info_file.read_text())
    try:
        best = info["best_model_or_ensemble"]
        selected = best["selected_model_or_models"]
        folds = info["folds"]
    except KeyError as e:
        raise ModelError(
            f"{info_file}: not a find_best_configuration output (missing {e.args[0]!r})"
        ) from None
    dataset_dir = info_file.parent
    models = [
        _check_model_folder(
            dataset_dir / f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}", folds, checkpoint
        )
        for m in selected
    ]
    pp = best.get("postprocessing_file")
    pp_path = _relocate(Path(pp), dataset_dir) if pp else None
    if pp_path is not None and not pp_path.is_file():
        raise ModelError(
            f"{info_file}: postprocessing_file {pp} does not exist (also not under {dataset_dir})"
        )
    return InferenceSetup(models, pp_path, source=str(info_file))


def _default_postprocessing(spec: ModelSpec) -> Path | None:
    # find_best_configuration writes postprocessing.pkl into crossval_results_folds_<folds>/ of the winning model.
    fold_str = "_".join(str(f) for f in spec.folds)
    exact = spec.folder / f"crossval_results_folds_{fold_str}" / "postprocessing.pkl"
    return exact if exact.is_file() else None


def resolve_models(
    model_args: list[str],
    folds: list[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    postprocessing: str | None = None,
) -> InferenceSetup:
    """Turn ``-m`` arguments into an :class:`InferenceSetup`.

    Each argument is a trained model folder (``.../DatasetXXX/Trainer__Plans__config``), or
    ``inference_information.json`` / the dataset results folder holding it (then it must be the only one).
    ``postprocessing``: a ``postprocessing.pkl`` path, ``"none"``, or None for nnU-Net's determined one if it exists.
    """
    if not model_args:
        raise ModelError("no model given (-m)")
    paths = [Path(m) for m in model_args]
    infos = [p if p.is_file() else p / INFERENCE_INFO for p in paths]
    if any(i.name == INFERENCE_INFO and i.is_file() for i in infos):
        if len(paths) > 1:
            raise ModelError("give find_best_configuration's output alone, not together with other models")
        setup = from_inference_information(infos[0], checkpoint)
        if folds:
            setup.notes.append("-f ignored: the folds come from inference_information.json")
    else:
        specs = []
        for p in paths:
            if not p.is_dir():
                raise ModelError(f"{p}: no such model folder")
            specs.append(_check_model_folder(p, folds, checkpoint))
        pp = _default_postprocessing(specs[0]) if len(specs) == 1 else None
        setup = InferenceSetup(specs, pp)
    if postprocessing == "none":
        setup.postprocessing = None
    elif postprocessing is not None:
        pp = Path(postprocessing)
        if not pp.is_file():
            raise ModelError(f"post-processing file {pp} does not exist")
        setup.postprocessing = pp
    labels = [m.dataset_json.get("labels") for m in setup.models]
    if any(lab != labels[0] for lab in labels[1:]):
        raise ModelError(f"the models to ensemble have different label sets: {labels}")
    return setup


def _check_channels(setup: InferenceSetup, cases: list[Case]) -> None:
    n = len(setup.dataset_json["channel_names"])
    bad = [f"{c.case_id} has {len(c.images)}" for c in cases if len(c.images) != n]
    if bad:
        raise ModelError(f"the model expects {n} channel(s) per case: " + "; ".join(bad))


def run_inference(
    setup: InferenceSetup,
    cases: list[Case],
    work_dir: str | Path,
    device: str = "cpu",
    tta: bool = True,
    step_size: float = 0.5,
    num_processes: int = 2,
) -> Path:
    """Predict every case with every model, ensemble, post-process. Returns the folder of final segmentations,
    named ``<case_id><dataset file_ending>`` with the geometry of each case's input image."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.ensembling.ensemble import ensemble_folders
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    _check_channels(setup, cases)
    work_dir = Path(work_dir)
    torch_device = torch.device(device)
    ensemble = len(setup.models) > 1
    member_dirs = []
    for i, spec in enumerate(setup.models):
        out = work_dir / f"model_{i}"
        out.mkdir(parents=True, exist_ok=True)
        log.info("predicting %d case(s) with %s folds %s", len(cases), spec.folder, spec.folds)
        predictor = nnUNetPredictor(
            tile_step_size=step_size,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=torch_device.type == "cuda",
            device=torch_device,
            verbose=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(spec.folder), spec.folds, spec.checkpoint)
        inputs = [[str(p) for p in c.images] for c in cases]
        outputs = [str(out / c.case_id) for c in cases]
        if num_processes == 0:
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=ensemble)
        else:
            predictor.predict_from_files(
                inputs,
                outputs,
                save_probabilities=ensemble,
                num_processes_preprocessing=num_processes,
                num_processes_segmentation_export=num_processes,
            )
        member_dirs.append(out)
    result = member_dirs[0]
    if ensemble:
        result = work_dir / "ensemble"
        ensemble_folders(
            [str(d) for d in member_dirs],
            str(result),
            num_processes=max(1, num_processes),
            dataset_json_file_or_dict=setup.dataset_json,
            plans_json_file_or_dict=setup.models[0].plans,
        )
    if setup.postprocessing is not None:
        pp_fns, pp_kwargs = load_pickle(str(setup.postprocessing))
        log.info(
            "applying nnU-Net post-processing %s: %s", setup.postprocessing, [f.__name__ for f in pp_fns]
        )
        pp_dir = work_dir / "postprocessed"
        apply_postprocessing_to_folder(
            str(result),
            str(pp_dir),
            pp_fns,
            pp_kwargs,
            plans_file_or_dict=setup.models[0].plans,
            dataset_json_file_or_dict=setup.dataset_json,
            num_processes=max(1, num_processes),
        )
        result = pp_dir
    return result
