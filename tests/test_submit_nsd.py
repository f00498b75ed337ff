"""Normalised surface Dice is the challenges' definition: DeepMind's surface-distance (surface elements on the
voxel corners weighted by their area), called the way KiTS23 (SimpleITK array order, reversed spacing) and FLARE
(nibabel x, y, z order with the header zooms) call it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import surface_distance
from scipy import ndimage

from mim_nnunet.submission.evaluate import dice, normalized_surface_dice


def ball(shape, spacing, center, radius_mm):
    idx = np.indices(shape).astype(float)
    return sum(((i - c) * s) ** 2 for i, c, s in zip(idx, center, spacing)) <= radius_mm**2


def blob(seed, shape=(20, 24, 22)):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2) > 0.5


def library_nsd_xyz(ref_zyx, pred_zyx, spacing_zyx, tol):
    """The library on nibabel-ordered arrays (x, y, z) with (sx, sy, sz), as FLARE's evaluation script calls it."""
    dist = surface_distance.compute_surface_distances(
        ref_zyx.transpose(2, 1, 0), pred_zyx.transpose(2, 1, 0), tuple(spacing_zyx[::-1])
    )
    return surface_distance.compute_surface_dice_at_tolerance(dist, tol)


def test_ball_shifted_by_one_thick_slice():
    """A 20 mm-radius ball on 5 mm slices (0.8 mm in-plane), shifted by one slice, at 2 mm tolerance.

    Counting boundary voxels between voxel centres (the old definition) gave 0.43 here; the surfel-area
    definition of the challenges gives 0.647: the ball's caps, where the shift moves the surface most, carry
    little area but many voxels."""
    spacing = (5.0, 0.8, 0.8)
    a = ball((16, 64, 64), spacing, (7.5, 31.5, 31.5), 20.0)
    b = np.roll(a, 1, axis=0)
    value = normalized_surface_dice(a, b, spacing, 2.0)
    assert value == pytest.approx(0.6471013947, abs=1e-6)
    assert value == pytest.approx(library_nsd_xyz(a, b, spacing, 2.0), abs=1e-12)


@pytest.mark.parametrize("spacing", [(5.0, 0.7, 0.7), (2.5, 1.2, 0.8), (1.0, 0.5, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_the_library_in_flare_axis_order(spacing, seed):
    """Anisotropic random shapes: our call (z, y, x arrays, reversed spacing) = FLARE's (x, y, z, zooms)."""
    a, b = blob(seed), blob(seed + 10)
    for tol in (1.0, 2.0, 5.0):
        ours = normalized_surface_dice(a, b, spacing, tol)
        assert 0.0 < ours < 1.0 or tol == 5.0
        assert ours == pytest.approx(library_nsd_xyz(a, b, spacing, tol), abs=1e-12)


def test_identical_masks_score_one_at_zero_tolerance():
    m = ball((30, 30, 30), (1.0, 2.0, 0.7), (15, 15, 15), 9.0)
    assert normalized_surface_dice(m, m, (1.0, 2.0, 0.7), 0.0) == 1.0
    assert dice(m, m) == 1.0


@pytest.mark.parametrize("shift", [(2, 0, 0), (0, 1, 3), (1, 1, 1)])
def test_rigid_shift_scores_one_at_the_shift_length(shift):
    """Surface elements sit on the voxel-corner grid, which a whole-voxel shift maps onto itself."""
    spacing = (2.5, 0.9, 1.2)
    a = ball((40, 40, 40), spacing, (18, 18, 18), 9.0)
    b = np.roll(a, shift, axis=(0, 1, 2))
    shift_mm = float(np.linalg.norm(np.asarray(shift) * spacing))
    assert normalized_surface_dice(a, b, spacing, shift_mm) == pytest.approx(1.0, abs=1e-12)
    assert normalized_surface_dice(a, b, spacing, shift_mm * 0.5) < 1.0


def test_empty_conventions():
    empty = np.zeros((8, 8, 8), bool)
    full = np.zeros((8, 8, 8), bool)
    full[2:5, 2:5, 2:5] = True
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1), 1.0))
    assert normalized_surface_dice(empty, empty, (1, 1, 1), 1.0, empty="one") == 1.0
    assert math.isnan(dice(empty, empty)) and dice(empty, empty, empty="one") == 1.0
    assert normalized_surface_dice(full, empty, (1, 1, 1), 100.0, empty="one") == 0.0
    assert normalized_surface_dice(empty, full, (1, 1, 1), 100.0) == 0.0
    with pytest.raises(ValueError, match="'nan' or 'one'"):
        normalized_surface_dice(full, full, (1, 1, 1), 1.0, empty="zero")


def test_two_dimensional_images():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.roll(a, 1, axis=0)
    dist = surface_distance.compute_surface_distances(a, b, (2.0, 1.0))
    assert normalized_surface_dice(a, b, (2.0, 1.0), 1.0) == pytest.approx(
        surface_distance.compute_surface_dice_at_tolerance(dist, 1.0)
    )
