"""Synthetic CT phantoms: the embedded default data (product.md, "Embedded default data").

No data can be downloaded, so the project generates its own: a body outline (fat shell over soft tissue) in
air, lungs, liver, spleen, kidneys (medulla + enhancing cortex), spine and ribs, contrast-filled vessels and
Gaussian noise, in Hounsfield units, stored as int16 NIfTI like a real CT.

Every phantom is an analytic object defined in *physical* (LPS, mm) coordinates and sampled on a grid with its
own spacing, size, origin and direction cosines. Directions are signed permutations: some images are stored
with flipped or permuted axes, exactly as real scans come, so any reader must use the image geometry and not
assume an identity direction. Everything is a pure function of the seed.

This module writes files but knows nothing about pre-training or networks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: label values of the labeled dataset (nnU-Net: consecutive integers, 0 = background)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}

AIR_HU = -1000


def _stream_seed(seed: int, stream: int, index: int) -> int:
    """An independent, deterministic per-case seed (corpus and dataset cases never coincide)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """Identity (40 %), the x/y flip of RAS-stored scans (30 %) or a random signed permutation (30 %)."""
    u = rng.random()
    if u < 0.4:
        return np.eye(3)
    if u < 0.7:
        return np.diag([-1.0, -1.0, 1.0])
    m = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)[None, :]
    return m


@dataclass
class _Grid:
    """Physical coordinates (mm) of every voxel, as arrays broadcastable to the (z, y, x) numpy array."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    shape: tuple[int, int, int]


def _grid(size_ijk, spacing_ijk, direction: np.ndarray, origin) -> _Grid:
    """Physical coordinates for a signed-permutation direction: each physical axis depends on one array axis."""
    shape_zyx = tuple(int(n) for n in size_ijk[::-1])
    coords = [None, None, None]
    for a in range(3):  # image axis a (i, j, k) is numpy axis 2 - a
        q = int(np.argmax(np.abs(direction[:, a])))  # the physical axis it runs along
        sign = direction[q, a]
        line = origin[q] + sign * spacing_ijk[a] * np.arange(size_ijk[a], dtype=np.float32)
        bshape = [1, 1, 1]
        bshape[2 - a] = size_ijk[a]
        coords[q] = line.astype(np.float32).reshape(bshape)
    return _Grid(coords[0], coords[1], coords[2], shape_zyx)


def _ellipsoid(g: _Grid, c, r) -> np.ndarray:
    return ((g.x - c[0]) / r[0]) ** 2 + ((g.y - c[1]) / r[1]) ** 2 + ((g.z - c[2]) / r[2]) ** 2 <= 1.0


def _segment_tube(g: _Grid, p0, p1, radius: float) -> np.ndarray:
    """Voxels within ``radius`` of the segment p0-p1 (a straight vessel)."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    d = p1 - p0
    t = ((g.x - p0[0]) * d[0] + (g.y - p0[1]) * d[1] + (g.z - p0[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (g.x - p0[0] - t * d[0]) ** 2 + (g.y - p0[1] - t * d[1]) ** 2 + (g.z - p0[2] - t * d[2]) ** 2
    return dist2 <= radius**2


def make_phantom(
    seed: int,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    labels: bool = True,
    *,
    direction: tuple[float, ...] | np.ndarray | None = None,
    noise_hu: float | None = None,
) -> tuple[sitk.Image, sitk.Image | None]:
    """One synthetic CT (int16, HU) and, if ``labels``, its label map (uint8, values of :data:`LABELS`).

    ``shape_mm``: physical extent (x, y, z) in mm; default drawn per axis in [100, 160].
    ``spacing``: SimpleITK order (image axes i, j, k); default in-plane 0.7-1.0 mm, slices 1.0-3.0 mm.
    ``direction``: 3x3 direction cosines (a signed permutation; row-major as SimpleITK); default drawn from the
    seed (identity, flipped or permuted). ``noise_hu``: Gaussian noise sigma; default drawn in [8, 20].
    """
    rng = np.random.default_rng(seed)
    ext = np.asarray(
        shape_mm if shape_mm is not None else rng.uniform(100.0, 160.0, size=3), dtype=np.float64
    )
    if spacing is None:
        inplane = rng.uniform(0.7, 1.0)
        spacing = (inplane, inplane, rng.uniform(1.0, 3.0))
    spacing_ijk = np.asarray(spacing, dtype=np.float64)
    d = np.asarray(direction, np.float64).reshape(3, 3) if direction is not None else _random_direction(rng)
    if not np.allclose(np.abs(d).sum(0), 1.0) or not np.allclose(np.abs(d).sum(1), 1.0):
        raise ValueError(f"direction must be a signed permutation matrix, got {d.tolist()}")

    phys_axis = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]
    size_ijk = [max(8, round(ext[phys_axis[a]] / spacing_ijk[a])) for a in range(3)]
    # origin such that the grid centre sits near the physical origin (a few mm of table offset)
    centre_idx = (np.asarray(size_ijk) - 1) / 2.0
    origin = -d @ (spacing_ijk * centre_idx) + rng.uniform(-5.0, 5.0, size=3)
    g = _grid(size_ijk, spacing_ijk, d, origin)
    hx, hy, hz = ext / 2.0  # half extents (x: patient left, y: posterior, z: superior)

    def j() -> float:  # size jitter
        return rng.uniform(0.9, 1.1)

    img = np.full(g.shape, AIR_HU, dtype=np.float32)
    lab = np.zeros(g.shape, dtype=np.uint8)

    # body: an ellipsoid long in z (cut by the field of view like a real scan), fat shell over soft tissue
    body_r = (0.88 * hx * j(), 0.80 * hy * j(), 1.6 * hz)
    body = _ellipsoid(g, (0, 0, 0), body_r)
    fat_mm = rng.uniform(5.0, 10.0)
    inner_r = (body_r[0] - fat_mm, body_r[1] - fat_mm, body_r[2])
    img[body] = rng.uniform(-110, -80)
    img[_ellipsoid(g, (0, 0, 0), inner_r)] = rng.uniform(35, 50)
    rx, ry = inner_r[0], inner_r[1]

    # lungs (upper part), then organs painted over them; the painting order decides what is visible
    for side in (-1, 1):
        img[
            _ellipsoid(
                g, (side * 0.45 * rx, 0.05 * ry, 0.55 * hz), (0.38 * rx * j(), 0.6 * ry * j(), 0.5 * hz)
            )
        ] = rng.uniform(-870, -830)
    organs = [  # (label, centre, radii, HU); patient right is -x in LPS
        (
            1,
            (-0.35 * rx, -0.1 * ry, 0.1 * hz),
            (0.5 * rx * j(), 0.55 * ry * j(), 0.35 * hz * j()),
            rng.uniform(55, 70),
        ),
        (
            2,
            (0.55 * rx, 0.35 * ry, 0.15 * hz),
            (0.2 * rx * j(), 0.25 * ry * j(), 0.2 * hz * j()),
            rng.uniform(40, 50),
        ),
    ]
    for label, c, r, hu in organs:
        m = _ellipsoid(g, c, r)
        img[m], lab[m] = hu, label
    cortex_hu, medulla_hu = rng.uniform(140, 180), rng.uniform(25, 35)
    for side in (-1, 1):
        c = (side * 0.45 * rx, 0.45 * ry, -0.45 * hz + side * 0.03 * hz)
        r = (0.16 * rx * j(), 0.2 * ry * j(), 0.28 * hz * j())
        m = _ellipsoid(g, c, r)
        img[m], lab[m] = cortex_hu, 3
        img[_ellipsoid(g, c, [0.65 * v for v in r])] = medulla_hu

    # liver vessels (kept in the liver label, as in common annotation protocols)
    lc = organs[0][1]
    for _ in range(3):
        p1 = np.asarray(lc) + rng.uniform(-0.5, 0.5, size=3) * np.asarray(organs[0][2])
        img[_segment_tube(g, lc, p1, rng.uniform(1.5, 3.0)) & (lab == 1)] = rng.uniform(160, 200)

    # aorta and inferior vena cava along z (label background)
    aorta = ((g.x - 0.12 * rx) ** 2 + (g.y - 0.2 * ry) ** 2 <= (0.09 * rx * j()) ** 2) & body
    img[aorta], lab[aorta] = rng.uniform(200, 260), 0
    ivc = ((g.x + 0.15 * rx) ** 2 + (g.y - 0.15 * ry) ** 2 <= (0.08 * rx * j()) ** 2) & body
    img[ivc], lab[ivc] = rng.uniform(140, 180), 0

    # spine: cortical ring around cancellous bone, vertebral bodies separated by discs
    sc, sr = (0.0, 0.55 * ry), 0.13 * min(rx, ry) * j()
    r2 = (g.x - sc[0]) ** 2 + (g.y - sc[1]) ** 2
    period = rng.uniform(22.0, 28.0)
    disc = np.abs(((g.z + rng.uniform(0, period)) % period) - period / 2) < 2.5
    spine = (r2 <= sr**2) & body
    img[spine], lab[spine] = rng.uniform(700, 1000), 0
    img[(r2 <= (0.75 * sr) ** 2) & body] = rng.uniform(250, 400)
    img[spine & disc] = rng.uniform(70, 100)

    # ribs: posterior-lateral arcs at the body wall, one every ~period mm in the upper half
    rib_hu, rib_r = rng.uniform(600, 900), rng.uniform(2.5, 4.0)
    rho = np.sqrt((g.x / (0.92 * rx)) ** 2 + (g.y / (0.92 * ry)) ** 2)
    radial = (rho - 1.0) * 0.92 * 0.5 * (rx + ry)
    for zk in np.arange(0.0, hz, period):
        rib = (radial**2 + (g.z - zk) ** 2 <= rib_r**2) & (g.y > -0.4 * ry)
        img[rib], lab[rib] = rib_hu, 0

    sigma = noise_hu if noise_hu is not None else rng.uniform(8.0, 20.0)
    img += rng.normal(0.0, sigma, size=g.shape).astype(np.float32) * (img > AIR_HU + 1)
    img += rng.normal(0.0, 0.25 * sigma, size=g.shape).astype(np.float32)  # air noise (weaker, like CT)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    def to_image(arr: np.ndarray) -> sitk.Image:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing([float(s) for s in spacing_ijk])
        im.SetOrigin([float(o) for o in origin])
        im.SetDirection([float(v) + 0.0 for v in d.ravel()])  # no -0.0 in headers
        return im

    return to_image(img), (to_image(lab) if labels else None)


def write_unlabeled_corpus(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> list[Path]:
    """Write ``n`` unlabeled phantoms ``phantom_XXXX.nii.gz`` into ``out_dir``; returns their paths.

    ``shape_mm`` / ``spacing`` fix the extent / spacing of every case (default: drawn per case).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image, _ = make_phantom(_stream_seed(seed, 0, i), shape_mm, spacing, labels=False)
        p = out / f"phantom_{i:04d}.nii.gz"
        sitk.WriteImage(image, str(p), useCompression=True)
        paths.append(p)
    return paths


def write_nnunet_dataset(
    raw_root: str | Path,
    dataset_id: int = 990,
    name: str = "MiMPhantom",
    n_train: int = 8,
    n_test: int = 2,
    seed: int = 0,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> Path:
    """A labeled nnU-Net v2 raw dataset ``raw_root/DatasetXXX_Name`` (imagesTr/labelsTr/imagesTs/labelsTs).

    Labels follow :data:`LABELS`. Training and test cases use seed streams distinct from
    :func:`write_unlabeled_corpus`, so a corpus and a dataset with the same seed share no case.
    ``shape_mm`` / ``spacing`` as in :func:`write_unlabeled_corpus`.
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for split, count, stream in (("Tr", n_train, 1), ("Ts", n_test, 2)):
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            case = f"{name}_{split.lower()}{i:03d}"
            image, label = make_phantom(_stream_seed(seed, stream, i), shape_mm, spacing, labels=True)
            sitk.WriteImage(
                image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"), useCompression=True
            )
            sitk.WriteImage(label, str(folder / f"labels{split}" / f"{case}.nii.gz"), useCompression=True)
    dataset_json = {
        "name": name,
        "description": f"Synthetic CT phantoms generated by mim_nnunet.data.phantoms (seed {seed})",
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "licence": "CC0 (synthetic)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
