"""Planner decisions (spacing, normalisation, patch and batch size) for isotropic, anisotropic and small data."""

from __future__ import annotations

import numpy as np
import pytest

from mim_nnunet import make_config
from mim_nnunet.nnunet.memory import MemoryModel
from mim_nnunet.nnunet.planner import (
    PlanningError,
    architecture_kwargs,
    decide_normalization,
    decide_patch_and_batch,
    decide_spacing,
    window_hint,
    window_intensity_properties,
)

CKPT_SPACING = [1.5, 1.5, 1.5]
GIB = 2**30


@pytest.fixture(scope="module")
def memory():
    return MemoryModel(architecture_kwargs(make_config("tiny"), (16, 16, 16)), 1, 4)


def plan(spacings, shapes, memory, target_gb=8.0):
    spacing, note = decide_spacing(spacings, shapes, CKPT_SPACING)
    new_shapes = [np.round(np.array(sh) * np.array(sp) / spacing) for sp, sh in zip(spacings, shapes)]
    median = np.median(new_shapes, 0)
    patch, batch, pnote = decide_patch_and_batch(
        median, memory, target_gb * GIB, float(np.prod(median)) * len(shapes)
    )
    return spacing, patch, batch, note


def test_isotropic_dataset_uses_checkpoint_spacing(memory):
    spacings = [[1.0, 0.8, 0.8], [1.2, 0.9, 0.9], [1.0, 0.7, 0.7]]
    shapes = [[120, 150, 150], [100, 140, 140], [130, 160, 160]]
    spacing, patch, batch, note = plan(spacings, shapes, memory)
    assert spacing.tolist() == CKPT_SPACING and "checkpoint" in note
    assert all(p % 16 == 0 for p in patch) and batch >= 2
    assert patch == [80, 80, 80]  # median shape (80, 84, 84) at 1.5 mm, rounded to 16


def test_memory_target_bounds_the_patch(memory):
    spacings = [[1.5, 1.5, 1.5]] * 4
    shapes = [[200, 200, 200]] * 4
    _, big, _, _ = plan(spacings, shapes, memory, target_gb=8.0)
    _, small, _, _ = plan(spacings, shapes, memory, target_gb=1.0)
    assert np.prod(small) < np.prod(big)
    assert memory.estimate(small, 2) <= 1.0 * GIB < memory.estimate([s + 16 for s in small], 2)
    assert all(p % 16 == 0 for p in small + big)


def test_anisotropic_dataset_keeps_coarse_axis(memory):
    spacings = [[5.0, 0.8, 0.8], [6.0, 0.8, 0.8], [5.0, 0.7, 0.7], [4.5, 0.9, 0.9]]
    shapes = [[30, 400, 400], [28, 380, 380], [32, 420, 420], [35, 400, 400]]
    spacing, patch, batch, note = plan(spacings, shapes, memory)
    assert spacing[1:].tolist() == [1.5, 1.5]
    assert spacing[0] == pytest.approx(np.percentile([5.0, 6.0, 5.0, 4.5], 10))
    assert "anisotropic" in note
    assert all(p % 16 == 0 for p in patch) and patch[0] < patch[1] and batch >= 2


def test_small_volumes_get_minimum_patch_and_batch(memory):
    spacings = [[1.5, 1.5, 1.5]] * 5
    shapes = [[20, 24, 22], [18, 26, 20], [22, 22, 22], [20, 20, 24], [21, 25, 23]]
    spacing, patch, batch, _ = plan(spacings, shapes, memory)
    assert patch == [32, 32, 32]  # at least a 2^3 token grid; nnU-Net pads the smaller images
    assert batch == 2  # 5 % of a tiny dataset is < 1 patch: the minimum wins


def test_impossible_memory_target_is_refused(memory):
    with pytest.raises(PlanningError, match="raise the memory target"):
        decide_patch_and_batch([64, 64, 64], memory, 0.1 * GIB, 1e7)


def test_ct_window_maps_hu_to_unit_interval_through_ctnormalization():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    props = window_intensity_properties([-1000, 1000])
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props)
    hu = np.array([[-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]])
    assert np.allclose(norm.run(hu.copy()), [[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]])


def test_window_hint_only_when_the_foreground_fills_little_of_the_window():
    phantoms = {"0": {"percentile_00_5": -243.0, "percentile_99_5": 189.0}}  # the study's fingerprint
    hint = window_hint([-1000, 1000], phantoms, ["0"])
    assert "HU [-243, 189]" in hint and "22%" in hint and "--window" in hint
    # A window the foreground fills (here 432 of 500 HU) gets no hint; neither does a channel without properties.
    assert window_hint([-250, 250], phantoms, ["0"]) == ""
    assert window_hint([-1000, 1000], phantoms, ["1"]) == ""
    # Only the part of the percentile range inside the window counts.
    wide = {"0": {"percentile_00_5": -3000.0, "percentile_99_5": -900.0}}
    assert "5%" in window_hint([-1000, 1000], wide, ["0"])


def test_non_ct_channel_refused_unless_fallback():
    assert decide_normalization({"0": "CT"}, False) == (["CTNormalization"], [])
    with pytest.raises(PlanningError, match="not CT"):
        decide_normalization({"0": "CT", "1": "T2"}, False)
    schemes, fallback = decide_normalization({"0": "CT", "1": "T2"}, True)
    assert schemes == ["CTNormalization", "ZScoreNormalization"] and fallback == ["1"]
