"""The MiM experiment planner: nnU-Net plans from the dataset fingerprint *and* a MiM checkpoint.

Owns every planning decision, each visible in the plans JSON (``configurations['3d_fullres']`` and the top-level
``mim`` record with the reasons). The decisions are pure functions of the fingerprint, the checkpoint metadata and
the memory target, so they are tested without files; :class:`MiMPlanner` wires them into nnU-Net's
``ExperimentPlanner`` (only ``3d_fullres``: the network is 3D).

- Spacing: the checkpoint's pre-training spacing, the scale the encoder learned. For strongly anisotropic data
  (nnU-Net's own test: the coarse axis' median spacing > 3x the others' *and* < 1/3 of their voxels) that axis is
  not up-sampled past nnU-Net's choice for it (the 10th percentile of its spacings): inventing 3x more slices
  costs memory and time and adds nothing the scanner saw. ``overwrite_target_spacing`` replaces the rule.
- Normalisation: the checkpoint's HU window to [0, 1] via ``CTNormalization`` with rewritten intensity properties
  (percentile_00_5 = mean = lo, percentile_99_5 = hi, std = hi - lo): exactly the pre-training mapping, unless a
  fine-tuning ``window`` is given (the paper fine-tunes with task windows, e.g. BTCV HU [-175, 250]). Non-CT
  channels are refused (the encoder only saw HU); with ``allow_non_ct`` they get nnU-Net's default scheme for
  their channel name and the stem is repeated over channels at loading (documented fallback).
- Patch size: from the median shape at the target spacing, each axis rounded to a multiple of 16 (at least 32: a
  2^3 token grid), then shrunk (largest axis first, by 16) until the memory model at batch 2 fits the target.
- Batch size: as many samples as the target allows, capped like nnU-Net (at most 5 % of the dataset's voxels per
  step), at least 2.
- Output heads: the memory model counts the heads nnU-Net's trainer will build (``LabelManager``: one per label,
  or one per foreground region for region-based training), not the entries of ``dataset.json['labels']``
  (nnU-Net's own planner counts those, one too many for KiTS23's regions). The dataset's labels and regions are
  checked first (:mod:`mim_nnunet.labels`).
- Architecture: ``mim_nnunet.model.segmentation.MiMSegmentationNetwork`` with the checkpoint's encoder kwargs,
  decoder widths, drop-path rate and the fixed ``strides`` nnU-Net uses for deep supervision.
- Provenance: checkpoint path, sha256 and a metadata summary.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from ..checkpoint import CheckpointMetadata, load_checkpoint
from ..labels import DatasetLabelsError, dataset_labels
from ..model.config import TOKEN_SIZE, MiMConfig
from ..model.segmentation import STRIDES, default_decoder_dims
from .memory import MemoryModel

log = logging.getLogger(__name__)

NETWORK_CLASS = "mim_nnunet.model.segmentation.MiMSegmentationNetwork"
DEFAULT_PLANS_NAME = "MiMPlans"
MIN_PATCH_EDGE = 2 * TOKEN_SIZE
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05  # nnU-Net's cap: one step sees at most 5 % of the dataset's voxels
DROP_PATH_RATE = 0.1
# How the encoder's feature maps are normalised before the decoder (model/segmentation.py). "per_map" is the
# authors' fine-tuning recipe; the demo measurement with and without the final norm did not separate the two
# within the time it could run (docs/finetuning.md, "The network"), so the recipe decides.
FEATURE_NORM = "per_map"
CT_CHANNEL_NAMES = ("ct",)


class PlanningError(RuntimeError):
    """A dataset/checkpoint combination the planner refuses; the message says why and what to do."""


def decide_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    checkpoint_spacing: Sequence[float],
    anisotropy_threshold: float = ANISO_THRESHOLD,
) -> tuple[np.ndarray, str]:
    """Target spacing (array axes) and a sentence explaining it."""
    spacings = np.asarray(spacings, dtype=float)
    target = np.asarray(checkpoint_spacing, dtype=float).copy()
    median = np.median(spacings, 0)
    median_shape = np.median(np.asarray(shapes, dtype=float), 0)
    worst = int(np.argmax(median))
    others = [i for i in range(len(median)) if i != worst]
    aniso_spacing = median[worst] > anisotropy_threshold * max(median[i] for i in others)
    aniso_voxels = median_shape[worst] * anisotropy_threshold < min(median_shape[i] for i in others)
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        if coarse > target[worst]:
            note = (
                f"checkpoint spacing {list(map(float, checkpoint_spacing))} mm, except axis {worst}: the data are "
                f"strongly anisotropic (median spacing {median.round(3).tolist()} mm), so that axis stays at "
                f"{coarse:.3f} mm (10th percentile of its spacings, nnU-Net's rule) instead of being up-sampled "
                f"{coarse / target[worst]:.1f}x"
            )
            target[worst] = coarse
            return target, note
    return target, f"checkpoint pre-training spacing {target.tolist()} mm"


def window_intensity_properties(window: Sequence[float]) -> dict:
    """CTNormalization properties that map HU ``[lo, hi]`` exactly to [0, 1] (clip, then (x - lo) / (hi - lo))."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise PlanningError(f"intensity window {list(window)} is empty")
    return {
        "max": hi,
        "mean": lo,
        "median": (lo + hi) / 2,
        "min": lo,
        "percentile_00_5": lo,
        "percentile_99_5": hi,
        "std": hi - lo,
    }


# A checkpoint window this much wider than the dataset's foreground intensities gets a hint (docs/study.md,
# diagnostics point 5: on the phantoms, -1000..1000 against a task window cost 0.10-0.23 Dice).
WINDOW_HINT_FRACTION = 0.5


def window_hint(window: Sequence[float], foreground_properties: dict, ct_channels: Sequence[str]) -> str:
    """A sentence when the dataset's foreground HU (0.5-99.5 percentiles) fill little of ``window``, else ''.

    ``foreground_properties`` is the fingerprint's ``foreground_intensity_properties_per_channel``. The planner
    only asks this for the checkpoint's own window (no ``--window`` given): a user who chose a window is not
    second-guessed.
    """
    lo, hi = float(window[0]), float(window[1])
    parts = []
    for key in ct_channels:
        props = foreground_properties.get(str(key))
        if not props:
            continue
        p_lo, p_hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        fraction = (min(p_hi, hi) - max(p_lo, lo)) / (hi - lo)
        if fraction < WINDOW_HINT_FRACTION:
            parts.append(
                f"channel {key}: the foreground's 0.5-99.5 percentiles, HU [{p_lo:.0f}, {p_hi:.0f}], fill "
                f"{max(fraction, 0.0):.0%} of the window [{lo:g}, {hi:g}]"
            )
    if not parts:
        return ""
    return (
        "; ".join(parts)
        + ". Tissues inside that range differ by only a few hundredths after the [0, 1] mapping; a task window "
        "(--window LO HI, e.g. -175 250 for abdominal organs or the percentiles above) gained 0.10-0.23 Dice on "
        "the phantoms (docs/study.md, diagnostics)"
    )


def decide_normalization(channel_names: dict, allow_non_ct: bool) -> tuple[list[str], list[str]]:
    """Normalisation scheme per channel and the channels that fell back (non-CT, only with ``allow_non_ct``)."""
    schemes, fallback = [], []
    for key, name in channel_names.items():
        if str(name).lower() in CT_CHANNEL_NAMES:
            schemes.append("CTNormalization")
            continue
        if not allow_non_ct:
            raise PlanningError(
                f"channel {key} is {name!r}, not CT: the MiM encoder was pre-trained on HU windowed to [0, 1]. "
                "Pass --allow_non_ct to normalise it with nnU-Net's default scheme for that channel instead."
            )
        schemes.append(get_normalization_scheme(name).__name__)
        fallback.append(str(key))
    return schemes, fallback


def segmentation_heads(dataset_json: dict) -> tuple[int, str]:
    """The output channels nnU-Net's trainer builds for ``dataset_json`` and a sentence naming them.

    nnU-Net's ``LabelManager`` decides (what ``nnUNetTrainer`` passes to ``build_network_architecture``): one head
    per label (softmax), or per foreground region (sigmoid) when a label is a region."""
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    n = lm.num_segmentation_heads
    if lm.has_regions:
        regions = ", ".join("+".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in lm.all_regions)
        return n, f"{n} output heads, one sigmoid per region ({regions}; nnU-Net's LabelManager)"
    labels = [int(v) for v in lm.all_labels]
    return n, f"{n} output heads, softmax over the labels {labels} (nnU-Net's LabelManager)"


def initial_patch_size(median_shape: Sequence[float]) -> list[int]:
    """Each axis of the median shape rounded to the nearest multiple of 16, at least 32."""
    return [max(MIN_PATCH_EDGE, int(round(s / TOKEN_SIZE)) * TOKEN_SIZE) for s in median_shape]


def decide_patch_and_batch(
    median_shape: Sequence[float],
    memory: MemoryModel,
    target_bytes: float,
    dataset_voxels: float,
) -> tuple[list[int], int, str]:
    """Largest patch (axes multiples of 16) whose batch-2 step fits ``target_bytes``; then the batch size."""
    patch = initial_patch_size(median_shape)
    start = list(patch)
    while memory.estimate(patch, MIN_BATCH_SIZE) > target_bytes:
        axis = int(np.argmax(patch))
        if patch[axis] <= MIN_PATCH_EDGE:
            raise PlanningError(
                f"even a {patch} patch needs {memory.estimate(patch, MIN_BATCH_SIZE) / 2**30:.2f} GiB at batch "
                f"{MIN_BATCH_SIZE}, more than the {target_bytes / 2**30:.2f} GiB target: raise the memory target"
            )
        patch[axis] -= TOKEN_SIZE
    per_sample = memory.per_sample_bytes(patch)
    by_memory = int((target_bytes - memory.fixed_bytes()) // per_sample)
    by_dataset = int(round(dataset_voxels * MAX_DATASET_COVERED / float(np.prod(patch))))
    batch = max(MIN_BATCH_SIZE, min(by_memory, by_dataset))
    note = (
        f"median shape {np.round(median_shape, 1).tolist()} -> start {start} -> {patch} fits "
        f"{target_bytes / 2**30:.2f} GiB at batch {MIN_BATCH_SIZE} (estimate "
        f"{memory.estimate(patch, MIN_BATCH_SIZE) / 2**30:.2f} GiB); batch {batch} "
        f"(memory allows {by_memory}, 5 % of the dataset allows {by_dataset}, minimum {MIN_BATCH_SIZE})"
    )
    return patch, batch, note


def architecture_kwargs(
    config: MiMConfig,
    patch_size: Sequence[int],
    drop_path_rate: float = DROP_PATH_RATE,
    feature_norm: str = FEATURE_NORM,
) -> dict:
    return {
        "patch_size": [int(p) for p in patch_size],
        "dims": list(config.dims),
        "conv_depths": list(config.conv_depths),
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_ratio,
        "drop_path_rate": drop_path_rate,
        "decoder_dims": list(default_decoder_dims(config.dims)),
        "strides": [list(s) for s in STRIDES],
        "conv_ln_eps": config.conv_ln_eps,
        "feature_norm": feature_norm,
    }


def checkpoint_record(path: Path, md: CheckpointMetadata) -> dict:
    return {
        "path": str(path),
        "sha256": md.weights_sha256,
        "preset": md.preset,
        "spacing": md.spacing,
        "intensity_window": md.intensity_window,
        "input_size": md.input_size,
        "crop_size": md.crop_size,
        "encoder_prefix": md.encoder_prefix,
        "step": md.step,
        "epoch": md.epoch,
        "code_version": md.code_version,
        "format_version": md.format_version,
        "corpus": md.corpus,
    }


class MiMPlanner(ExperimentPlanner):
    """nnU-Net ``ExperimentPlanner`` whose 3d_fullres configuration is planned for a MiM checkpoint."""

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = DEFAULT_PLANS_NAME,
        overwrite_target_spacing: Sequence[float] | None = None,
        suppress_transpose: bool = False,
        checkpoint: str | Path | None = None,
        allow_non_ct: bool = False,
        window: Sequence[float] | None = None,
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        if checkpoint is None:
            raise PlanningError("MiMPlanner needs the MiM pre-training checkpoint (-pt)")
        try:  # before the checkpoint is hashed: a bad dataset.json is found at once
            dataset_labels(self.dataset_json, str(Path(self.raw_dataset_folder) / "dataset.json"))
        except DatasetLabelsError as e:
            raise PlanningError(str(e)) from None
        self.checkpoint = Path(checkpoint).resolve()
        # Full load: the sha256 of the weights is verified before anything is planned on them.
        _, self.metadata = load_checkpoint(self.checkpoint, verify=True)
        self.mim_config = MiMConfig.from_dict(self.metadata.config)
        self.allow_non_ct = allow_non_ct
        pre = [float(w) for w in self.metadata.intensity_window]
        self.window = pre if window is None else [float(w) for w in window]
        window_intensity_properties(self.window)  # an empty window is refused before any work
        self.window_given = window is not None
        self.window_note = (
            "the checkpoint's pre-training window"
            if self.window == pre
            else f"fine-tuning window (--window; pre-training window {pre})"
        )
        self.notes: dict[str, str] = {}

    def determine_fullres_target_spacing(self) -> np.ndarray:
        if self.overwrite_target_spacing is not None:
            self.notes["spacing"] = (
                f"overwrite_target_spacing {list(self.overwrite_target_spacing)} mm (user)"
            )
            return np.array(self.overwrite_target_spacing, dtype=float)
        target, note = decide_spacing(
            self.dataset_fingerprint["spacings"],
            self.dataset_fingerprint["shapes_after_crop"],
            self.metadata.spacing,
        )
        self.notes["spacing"] = note
        return target

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(
        self,
    ) -> tuple[list[str], list[bool]]:
        schemes, fallback = decide_normalization(self.dataset_json["channel_names"], self.allow_non_ct)
        lo, hi = self.window
        if not self.window_given:
            ct = [
                k
                for k, scheme in zip(self.dataset_json["channel_names"], schemes)
                if scheme == "CTNormalization"
            ]
            hint = window_hint(
                self.window, self.dataset_fingerprint["foreground_intensity_properties_per_channel"], ct
            )
            if hint:
                self.notes["window_hint"] = hint
        self.notes["normalization"] = (
            f"CT channels: HU [{lo}, {hi}] -> [0, 1] through CTNormalization, {self.window_note}"
        ) + (
            f"; non-CT channels {fallback}: nnU-Net's default scheme (--allow_non_ct fallback)"
            if fallback
            else ""
        )
        return schemes, [False] * len(schemes)

    def get_plans_for_configuration(
        self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
    ):
        n_in = len(self.dataset_json["channel_names"])
        n_out, heads_note = segmentation_heads(self.dataset_json)
        memory = MemoryModel(architecture_kwargs(self.mim_config, (16, 16, 16)), n_in, n_out)
        patch, batch, note = decide_patch_and_batch(
            median_shape, memory, self.UNet_vram_target_GB * 2**30, approximate_n_voxels_dataset
        )
        self.notes["output_heads"] = heads_note
        self.notes["patch_and_batch"] = note
        resampling_data, data_kwargs, resampling_seg, seg_kwargs = self.determine_resampling()
        resampling_softmax, softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        schemes, use_mask = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": batch,
            "patch_size": patch,
            "median_image_size_in_voxels": [float(s) for s in median_shape],
            "spacing": [float(s) for s in spacing],
            "normalization_schemes": schemes,
            "use_mask_for_norm": use_mask,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg_kwargs": seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": softmax_kwargs,
            "architecture": {
                "network_class_name": NETWORK_CLASS,
                "arch_kwargs": architecture_kwargs(self.mim_config, patch),
                "_kw_requires_import": [],
            },
            "batch_dice": False,
        }

    def plan_experiment(self) -> dict:
        transpose_forward, transpose_backward = self.determine_transpose()
        spacing = self.determine_fullres_target_spacing()
        new_shapes = [
            compute_new_shape(shape, sp, spacing)
            for sp, shape in zip(
                self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"]
            )
        ]
        median_shape = np.median(new_shapes, 0)[transpose_forward]
        n_voxels = float(np.prod(median_shape, dtype=np.float64) * self.dataset_json["numTraining"])
        fullres = self.get_plans_for_configuration(
            spacing[transpose_forward],
            median_shape,
            self.generate_data_identifier("3d_fullres"),
            n_voxels,
            {},
        )
        intensity = dict(self.dataset_fingerprint["foreground_intensity_properties_per_channel"])
        for key, scheme in zip(self.dataset_json["channel_names"], fullres["normalization_schemes"]):
            if scheme == "CTNormalization":
                intensity[str(key)] = window_intensity_properties(self.window)
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [
                float(i) for i in np.median(self.dataset_fingerprint["spacings"], 0)[transpose_forward]
            ],
            "original_median_shape_after_transp": [
                int(round(i))
                for i in np.median(self.dataset_fingerprint["shapes_after_crop"], 0)[transpose_forward]
            ],
            "image_reader_writer": self.determine_reader_writer().__name__,
            "transpose_forward": [int(i) for i in transpose_forward],
            "transpose_backward": [int(i) for i in transpose_backward],
            "configurations": {"3d_fullres": fullres},
            "experiment_planner_used": self.__class__.__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": intensity,
            "mim": {
                "checkpoint": checkpoint_record(self.checkpoint, self.metadata),
                "memory_target_gb": float(self.UNet_vram_target_GB),
                "intensity_window": self.window,
                "decisions": dict(self.notes),
                "dataset_intensity_properties_per_channel": self.dataset_fingerprint[
                    "foreground_intensity_properties_per_channel"
                ],
            },
        }
        # nnU-Net keeps a copy of dataset.json next to the plans.
        shutil.copy(
            Path(self.raw_dataset_folder) / "dataset.json",
            Path(nnUNet_preprocessed) / self.dataset_name / "dataset.json",
        )
        for k, v in self.notes.items():
            (log.warning if k == "window_hint" else log.info)("MiM plan %s: %s", k, v)
        self.plans = plans
        self.save_plans(plans)
        return plans
