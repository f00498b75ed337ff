"""Normalised surface Dice against closed-form answers (shifted cubes, concentric and shifted spheres)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mim_nnunet.submission.evaluate import dice, normalized_surface_dice, surface


def cube(shape, start, n):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + n) for s in start)] = True
    return m


def sphere(shape, center, radius_vox):
    idx = np.indices(shape)
    r2 = sum((i - c) ** 2 for i, c in zip(idx, center))
    return r2 <= radius_vox**2


def n_surface(n):
    """Surface voxels of an n^3 cube (face-connected border): n^3 - (n-2)^3."""
    return n**3 - (n - 2) ** 3


def brute_force_nsd(a, b, spacing, tol):
    """Same definition, all pairwise distances: independent of the distance transform and the crop."""
    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(pa) + len(pb))


def test_identical_masks_score_one():
    m = sphere((30, 30, 30), (15, 15, 15), 7)
    assert normalized_surface_dice(m, m, (1.0, 2.0, 0.7), 0.0) == 1.0
    assert dice(m, m) == 1.0


def test_empty_conventions():
    empty = np.zeros((8, 8, 8), bool)
    full = cube((8, 8, 8), (2, 2, 2), 3)
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1), 1.0))
    assert math.isnan(dice(empty, empty))
    assert normalized_surface_dice(full, empty, (1, 1, 1), 100.0) == 0.0
    assert normalized_surface_dice(empty, full, (1, 1, 1), 100.0) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_exact(k, axis):
    n, shape = 10, (24, 24, 24)
    spacing = (2.0, 1.5, 0.8)
    start = [6, 6, 6]
    a = cube(shape, start, n)
    start[axis] += k
    b = cube(shape, start, n)
    shift_mm = k * spacing[axis]
    # Below the smallest spacing only coinciding surface voxels count: the side rings over the n-k shared slices.
    expected_zero_tol = (n - k) * (4 * n - 4) / n_surface(n)
    assert normalized_surface_dice(a, b, spacing, 0.5 * min(spacing)) == pytest.approx(
        expected_zero_tol, abs=1e-12
    )
    # The surface moved rigidly by shift_mm: every surface voxel has its image on the other surface at that distance.
    assert normalized_surface_dice(a, b, spacing, shift_mm) == 1.0
    assert dice(a, b) == pytest.approx((n - k) / n, abs=1e-12)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_shifted_cube_intermediate_tolerance(t):
    """One-voxel shift along a coarse axis (3 mm) with 1 mm in-plane spacing, tolerance t mm < 3 mm.

    Counted per surface: the side ring over the n-1 shared slices (distance 0), plus the end face that lies inside
    the other cube, whose interior voxels are min(y, n-1-y, z, n-1-z) mm from the other cube's side ring.
    """
    n, sx = 10, 3.0
    a = cube((20, 20, 20), (5, 5, 5), n)
    b = cube((20, 20, 20), (6, 5, 5), n)
    end_face = (n - 2) ** 2 - max(n - 2 - 2 * t, 0) ** 2
    expected = ((n - 1) * (4 * n - 4) + end_face) / n_surface(n)
    assert normalized_surface_dice(a, b, (sx, 1.0, 1.0), t + 0.5) == pytest.approx(expected, abs=1e-12)


def test_concentric_spheres_bounds():
    """Radii R and R+d voxels: surface voxels lie within one voxel inside each sphere's radius, so every
    surface-to-surface distance is in (d-1, d+2) voxels: NSD is exactly 0 below and exactly 1 above."""
    s, R, d = 1.5, 8, 4
    a = sphere((40, 40, 40), (20, 20, 20), R)
    b = sphere((40, 40, 40), (20, 20, 20), R + d)
    assert normalized_surface_dice(a, b, (s, s, s), (d - 1) * s - 1e-6) == 0.0
    assert normalized_surface_dice(a, b, (s, s, s), (d + 2) * s) == 1.0


@pytest.mark.parametrize("shift", [(2, 0, 0), (0, 1, 3), (1, 1, 1)])
def test_shifted_sphere_full_score_at_shift_length(shift):
    spacing = (2.5, 0.9, 1.2)
    a = sphere((40, 40, 40), (18, 18, 18), 7)
    b = sphere((40, 40, 40), tuple(18 + s for s in shift), 7)
    shift_mm = float(np.linalg.norm(np.asarray(shift) * spacing))
    assert normalized_surface_dice(a, b, spacing, shift_mm) == 1.0
    assert normalized_surface_dice(a, b, spacing, shift_mm * 0.5) < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 16, 14)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    a = sphere(shape, rng.integers(5, 10, 3), rng.uniform(3, 5)) | cube(shape, rng.integers(0, 6, 3), 5)
    b = sphere(shape, rng.integers(5, 10, 3), rng.uniform(3, 5))
    for tol in (0.0, 0.7, 1.5, 3.0, 6.0):
        assert normalized_surface_dice(a, b, spacing, tol) == pytest.approx(
            brute_force_nsd(a, b, spacing, tol)
        )


def test_mask_touching_the_border_counts_border_as_surface():
    a = np.zeros((6, 6, 6), bool)
    a[:3] = True  # fills the first three slices, touching five image faces
    assert surface(a).sum() == a.sum() - 1 * 4 * 4  # only voxels with all 6 neighbours inside are interior
