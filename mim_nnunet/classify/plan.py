"""The classification plan: every decision of ``mim_nnunet_classify train`` before training, with its reason.

Owns the planning decisions, as pure functions of the dataset fingerprint, the checkpoint metadata and a memory
target (written to ``RUN/plan.json``, which prediction rebuilds the network and the input pipeline from):

- spacing: the checkpoint's pre-training spacing, except along a strongly anisotropic axis (the segmentation
  planner's rule, :func:`mim_nnunet.nnunet.planner.decide_spacing`); ``--spacing`` overrides;
- intensities: the checkpoint's HU window to [0, 1] for CT channels (``--window`` overrides); other channels are
  refused unless ``--allow-non-ct`` (then z-scored per case);
- input size: the median case size at that spacing, each axis rounded to a multiple of 16 (at least 32), shrunk
  (largest axis first) until a batch of 2 fits the memory target (the segmentation planner's memory model, here
  for the classifier); cases are padded or centre-cropped to it (:mod:`.images`); ``--input-size`` overrides;
- batch size: what the memory target allows, at least 2, at most :data:`MAX_BATCH_SIZE` and the number of training
  cases; ``--batch-size`` overrides;
- network: the checkpoint's encoder (same dims, depths, heads, LayerNorm eps), the chosen pooling and drop-path.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointError, CheckpointMetadata, read_metadata
from ..model.config import TOKEN_SIZE, MiMConfig
from ..nnunet.memory import MemoryModel
from ..nnunet.planner import (
    PlanningError,
    checkpoint_record,
    decide_normalization,
    decide_patch_and_batch,
    decide_spacing,
)
from .dataset import ClassificationDataset
from .images import CT, ZSCORE, read_geometry
from .model import POOLINGS, MiMClassifier

log = logging.getLogger(__name__)

MODES = ("finetune", "scratch", "linear_probe")
MAX_BATCH_SIZE = 16
MIN_BATCH_SIZE = 2
DROP_PATH_RATE = 0.1
FIT = "pad with 0 (air) where smaller, centre-crop where larger, at the planned spacing (no resizing)"


class PlanError(ValueError):
    """A request the planner refuses (one line: the value and what was expected)."""


@dataclass
class PlanRequest:
    """What the user may fix instead of the planner (None: planned)."""

    mode: str = "finetune"
    pooling: str = "mean"
    spacing: list[float] | None = None
    window: list[float] | None = None
    input_size: list[int] | None = None
    batch_size: int | None = None
    memory_target_gib: float = 8.0
    allow_non_ct: bool = False
    drop_path_rate: float = DROP_PATH_RATE


@dataclass
class ClassifyPlan:
    classes: list[str]
    channel_names: dict[str, str]
    file_ending: str
    spacing: list[float]
    window: list[float]
    normalization: list[str]
    input_size: list[int]
    batch_size: int
    mode: str
    pooling: str
    network: dict  # MiMClassifier keyword arguments besides num_classes and input_size
    checkpoint: dict  # path, sha256 and metadata summary of the MiM checkpoint
    fit: str = FIT
    fingerprint: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifyPlan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def build_network(self) -> MiMClassifier:
        return MiMClassifier(len(self.classes), self.input_size, pooling=self.pooling, **self.network)


def read_checkpoint_metadata(path: str | Path) -> CheckpointMetadata:
    """The metadata of a MiM checkpoint; a file that is not one is a :class:`PlanError` naming it."""
    try:
        return read_metadata(path)
    except CheckpointError as e:
        raise PlanError(str(e)) from None


def fingerprint(ds: ClassificationDataset) -> dict:
    """Sizes and spacings (z, y, x, after reorientation) of every training case's first channel (headers only)."""
    geometry = {case: read_geometry(ds.images[case][0]) for case in ds.cases}
    return {
        "cases": len(geometry),
        "shapes": [geometry[c][0] for c in ds.cases],
        "spacings": [geometry[c][1] for c in ds.cases],
    }


def network_kwargs(config: MiMConfig, in_channels: int, drop_path_rate: float) -> dict:
    return {
        "in_channels": in_channels, "dims": list(config.dims), "conv_depths": list(config.conv_depths),
        "depth": config.depth, "num_heads": config.num_heads, "mlp_ratio": config.mlp_ratio,
        "drop_path_rate": drop_path_rate, "conv_ln_eps": config.conv_ln_eps,
    }  # fmt: skip


def decide_input_and_batch(
    median_shape, memory: MemoryModel, target_gib: float, n_train: int, input_size=None, batch_size=None
) -> tuple[list[int], int, str]:
    """Input size (axes multiples of 16) and batch size, with the sentence that explains them."""
    target = target_gib * 2**30
    if input_size is not None:
        bad = [s for s in input_size if s % TOKEN_SIZE or s < TOKEN_SIZE]
        if bad or len(input_size) != 3:
            raise PlanError(f"--input-size {list(input_size)}: expected three multiples of {TOKEN_SIZE} (z y x)")
        size, why = [int(s) for s in input_size], f"--input-size {list(input_size)}"
    else:
        try:
            size, _, _ = decide_patch_and_batch(median_shape, memory, target, dataset_voxels=1e18)
        except PlanningError as e:
            raise PlanError(str(e)) from None
        why = (f"median case {np.round(median_shape, 1).tolist()} voxels at the planned spacing -> {size} "
               f"(multiples of {TOKEN_SIZE}, shrunk until batch {MIN_BATCH_SIZE} fits {target_gib:g} GiB)")  # fmt: skip
    by_memory = int((target - memory.fixed_bytes()) // memory.per_sample_bytes(size))
    if batch_size is not None:
        batch, how = int(batch_size), f"--batch-size {batch_size}"
    else:
        batch = max(min(MIN_BATCH_SIZE, n_train), min(by_memory, MAX_BATCH_SIZE, n_train))
        how = (f"batch {batch} (memory allows {by_memory}, at most {MAX_BATCH_SIZE} and the {n_train} training "
               f"cases, at least {MIN_BATCH_SIZE})")  # fmt: skip
    est = memory.estimate(size, batch) / 2**30
    return size, batch, f"{why}; {how}; estimated {est:.2f} GiB per training step"


def plan_classification(
    ds: ClassificationDataset, checkpoint: str | Path, request: PlanRequest, n_train: int, fp: dict | None = None
) -> ClassifyPlan:
    """The plan for training on ``ds`` (``n_train`` cases in the fold) from the MiM checkpoint ``checkpoint``."""
    if request.mode not in MODES:
        raise PlanError(f"mode {request.mode!r}: expected one of {MODES}")
    if request.pooling not in POOLINGS:
        raise PlanError(f"--pooling {request.pooling!r}: expected one of {POOLINGS}")
    md = read_checkpoint_metadata(checkpoint)
    config = MiMConfig.from_dict(md.config)
    fp = fp or fingerprint(ds)
    reasons = {}
    if request.spacing is not None:
        spacing = [float(s) for s in (request.spacing * 3 if len(request.spacing) == 1 else request.spacing)]
        reasons["spacing"] = f"--spacing {spacing}"
    else:
        target, reasons["spacing"] = decide_spacing(fp["spacings"], fp["shapes"], md.spacing)
        spacing = [float(s) for s in target]
    window = [float(w) for w in (request.window or md.intensity_window)]
    if not window[1] > window[0]:
        raise PlanError(f"--window {window}: expected LO < HI")
    reasons["window"] = (f"--window {window}" if request.window else f"the checkpoint's pre-training window {window} HU") + " -> [0, 1]"
    try:
        schemes, fallback = decide_normalization(ds.channel_names, request.allow_non_ct)
    except PlanningError as e:
        raise PlanError(f"{ds.root / 'dataset.json'}: {e}".replace("--allow_non_ct", "--allow-non-ct")) from None
    normalization = [CT if s == "CTNormalization" else ZSCORE for s in schemes]
    if fallback:
        reasons["normalization"] = f"channels {fallback} are not CT: z-scored per case (--allow-non-ct)"
    kwargs = network_kwargs(config, len(ds.channel_names), request.drop_path_rate)
    memory = MemoryModel.for_network(MiMClassifier(len(ds.classes), (16, 16, 16), **kwargs), len(ds.channel_names))
    resampled = np.asarray(fp["shapes"], float) * np.asarray(fp["spacings"], float) / np.asarray(spacing)
    median = np.median(resampled, 0)
    size, batch, reasons["input_and_batch"] = decide_input_and_batch(
        median, memory, request.memory_target_gib, n_train, request.input_size, request.batch_size
    )
    reasons["fit"] = FIT
    reasons["mode"] = {
        "finetune": "encoder initialised from the checkpoint, trained with layer-wise LR decay",
        "scratch": "the identical network from random initialisation (the checkpoint only defines its shape, "
        "spacing and window)",
        "linear_probe": "encoder initialised from the checkpoint and frozen; only the head trains",
    }[request.mode]
    summary = {"median_spacing": np.median(np.asarray(fp["spacings"]), 0).tolist(),
               "median_shape": np.median(np.asarray(fp["shapes"]), 0).tolist(),
               "median_resampled_shape": median.round(1).tolist(), "cases": fp["cases"]}  # fmt: skip
    return ClassifyPlan(
        classes=list(ds.classes), channel_names=dict(ds.channel_names), file_ending=ds.file_ending,
        spacing=spacing, window=window, normalization=normalization, input_size=size, batch_size=batch,
        mode=request.mode, pooling=request.pooling, network=kwargs,
        checkpoint=checkpoint_record(Path(checkpoint).resolve(), md) | {"config": md.config}, fingerprint=summary,
        reasons=reasons,
    )  # fmt: skip
