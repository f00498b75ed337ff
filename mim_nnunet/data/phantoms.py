"""Synthetic CT phantoms: the embedded default data (product.md, "Embedded default data").

No data can be downloaded, so the project generates its own: a body outline (fat shell over soft tissue) in
air, lungs, liver, spleen, kidneys (medulla + enhancing cortex), an unlabeled stomach and bowel loops, spine and
ribs, contrast-filled vessels, a partial-volume blur and Gaussian noise, in Hounsfield units, stored as int16
NIfTI like a real CT. The labeled organs are a fair test (docs/study.md, "The phantoms as a test"): visible
over the noise, but with randomly shaped outlines, textures and HU ranges shared with their neighbours, so
that no HU threshold segments them; :func:`organ_report` measures both.

Lesions are optional and each disease is its own function registered in :data:`DISEASES` (docs/tumours.md):
liver lesions (:func:`_liver_lesions`) and kidney masses, tumours and cysts (:func:`_kidney_masses`). They draw
from their own seed streams and are painted after the anatomy and before the blur and the noise, so a phantom
without lesions is the organ phantom of its seed, voxel for voxel, and one with lesions differs from it only
within the blur's reach of a lesion. :func:`lesion_report` extends the organ measures to every lesion.
:data:`TASKS` names the labeled datasets: the organs, a KiTS23-like kidney-tumour one (region-based labels) and
an MSD Task03-like liver-tumour one.

A chest field of view (:data:`FIELDS`, ``make_phantom(field="chest")``) centres the same body on its lungs, adds
a heart and gives the lungs a parenchyma that varies as normal chest CTs do (density, a dependent gradient,
vessels, atelectasis, emphysema); they are labeled (:data:`LUNG_LABELS`). A case-level lung disease of
:data:`LUNG_DISEASES` (lobar consolidation, peripheral ground glass) is painted in them, on its own seed stream;
:data:`CLASSIFICATION_TASKS` names the CC-CCII-like classification dataset written from them (no labels, a
case -> class table), and :func:`single_feature_accuracy` measures that no global lung number decides its class
(docs/classification.md, "The phantoms"); :func:`write_unlabeled_corpus` with ``field="chest"`` writes an
unlabeled chest corpus, its lungs sick or healthy in the dataset's proportions, for pre-training.

Every phantom is an analytic object defined in *physical* (LPS, mm) coordinates and sampled on a grid with its
own spacing, size, origin and direction cosines. Directions are signed permutations: some images are stored
with flipped or permuted axes, exactly as real scans come, so any reader must use the image geometry and not
assume an identity direction. Everything is a pure function of the seed.

This module writes files but knows nothing about pre-training or networks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

#: label values of the labeled dataset (nnU-Net: consecutive integers, 0 = background)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}
#: label values of the lesions in a phantom's label map (after the organs; a task's dataset renumbers them)
LESION_LABELS = {"liver_tumour": 4, "kidney_tumour": 5, "kidney_cyst": 6}
#: the organ each lesion label grows in: its contrast is measured against that organ's parenchyma
LESION_HOST = {
    LESION_LABELS["liver_tumour"]: LABELS["liver"],
    LESION_LABELS["kidney_tumour"]: LABELS["kidneys"],
    LESION_LABELS["kidney_cyst"]: LABELS["kidneys"],
}

#: label values of a chest phantom's lungs (after the lesions): the lung, and where a disease of
#: :data:`LUNG_DISEASES` is painted in it (the ground truth of its extent)
LUNG_LABELS = {"lung": 7, "consolidation": 8, "ground_glass": 9}

AIR_HU = -1000
#: sigma (mm) of the Gaussian point-spread function that blurs every border (partial volume)
PSF_MM = 0.8


@dataclass(frozen=True)
class _Field:
    """Where a phantom's field of view sits on the body, and the shapes that differ with it.

    Fractions of the body's half extents (hx, hy, hz; rx, ry inside the fat), as everywhere in
    :func:`make_phantom`. The body's hz is the field's z half extent over ``half_z``.
    """

    centre_z: float  # the field's centre above the body's, per hz
    half_z: float  # the field's z half extent, per hz
    body_rz: float  # the body ellipsoid's z radius, per hz (a long one is a cylinder across the field)
    lung_c: tuple[float, float, float]  # a lung's centre: x per rx (either side), y per ry, z per hz
    lung_r: tuple[float, float, float]  # its radii, per rx, ry, hz


#: the fields of view of :func:`make_phantom`: the abdomen (the organ phantoms; lung bases in its upper half) and
#: the chest (centred on the lungs, which fill its height and most of its width; the liver dome at its foot)
FIELDS = {
    "abdomen": _Field(0.0, 1.0, 1.6, (0.45, 0.05, 0.55), (0.38, 0.6, 0.5)),
    "chest": _Field(0.6, 0.55, 8.0, (0.5, 0.05, 0.6), (0.42, 0.75, 0.52)),
}


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

    def box(self, c, half) -> tuple[tuple[slice, ...], _Grid] | None:
        """The voxels within ``half`` (x, y, z, mm) of the point ``c``: (numpy slices, their sub-grid)."""
        sl = [slice(0, 0)] * 3
        coords = (self.x, self.y, self.z)
        for q in range(3):
            n = int(np.argmax(coords[q].shape))  # the numpy axis this physical axis runs along
            idx = np.flatnonzero(np.abs(coords[q].ravel() - c[q]) <= half[q])
            if idx.size == 0:
                return None
            sl[n] = slice(int(idx[0]), int(idx[-1]) + 1)
        sub = [a[tuple(sl[n] if a.shape[n] > 1 else slice(None) for n in range(3))] for a in coords]
        shape = tuple(s.stop - s.start for s in sl)
        return tuple(sl), _Grid(sub[0], sub[1], sub[2], shape)


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


class _Blob:
    """A smooth random shape: an ellipsoid rotated about z, its radius wobbled by low-order angular waves.

    Defined in physical coordinates, so the same seed gives the same object on any grid. ``mask(g, scale)``
    is the shape shrunk by ``scale`` about its centre (a kidney's medulla inside its cortex).
    """

    def __init__(self, rng: np.random.Generator, c, r, wobble: float = 0.2):
        self.c, self.r = tuple(float(v) for v in c), tuple(float(v) for v in r)
        self.angle = rng.uniform(-0.35, 0.35)  # about +-20 degrees
        self.waves = rng.normal(size=(3, 3)) * rng.uniform(1.0, 2.5, size=(3, 1))  # 3 waves, 1-2.5 per radian
        self.phases = rng.uniform(0, 2 * np.pi, size=3)
        self.amps = rng.uniform(0.3, 1.0, size=3) * wobble / 1.5

    def mask(self, g: _Grid, scale: float = 1.0) -> np.ndarray:
        out = np.zeros(g.shape, bool)
        found = self.box(g, scale)
        if found is not None:  # only the blob's bounding box is evaluated: the phantom stays fast
            sl, sub = found
            out[sl] = self._inside(sub, scale)
        return out

    def box(self, g: _Grid, scale: float = 1.0) -> tuple[tuple[slice, ...], _Grid] | None:
        reach = scale * (1.0 + float(self.amps.sum()))
        return g.box(self.c, (max(self.r[:2]) * reach, max(self.r[:2]) * reach, self.r[2] * reach))

    def _inside(self, g: _Grid, scale: float) -> np.ndarray:
        rho, edge = self._radius(g)
        return rho <= scale * edge

    def _radius(self, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Every voxel's radius in the ellipsoid's units, and where the wobbled outline lies (about 1)."""
        dx, dy, dz = g.x - self.c[0], g.y - self.c[1], g.z - self.c[2]
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        u = (ca * dx + sa * dy) / self.r[0]
        v = (-sa * dx + ca * dy) / self.r[1]
        w = dz / self.r[2]
        rho = np.sqrt(u**2 + v**2 + w**2) + 1e-6
        wob = sum(
            a * np.cos((k[0] * u + k[1] * v + k[2] * w) / rho + p)
            for k, p, a in zip(self.waves, self.phases, self.amps)
        )
        return rho, 1.0 + wob


def _texture(g: _Grid, rng: np.random.Generator, wavelength_mm: float, n: int = 6) -> np.ndarray:
    """A smooth random field of unit standard deviation: ``n`` plane waves of about ``wavelength_mm``."""
    field = np.zeros(g.shape, np.float32)
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4) * np.linalg.norm(k))
        field += np.cos(k[0] * g.x + k[1] * g.y + k[2] * g.z + rng.uniform(0, 2 * np.pi))
    return field * np.float32(np.sqrt(2.0 / n))


def make_phantom(
    seed: int,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    labels: bool = True,
    *,
    direction: tuple[float, ...] | np.ndarray | None = None,
    noise_hu: float | None = None,
    lesions: Mapping[str, int] | None = None,
    field: str = "abdomen",
    lung_disease: str | None = None,
) -> tuple[sitk.Image, sitk.Image | None]:
    """One synthetic CT (int16, HU) and, if ``labels``, its label map (uint8, values of :data:`LABELS`).

    ``shape_mm``: physical extent (x, y, z) in mm; default drawn per axis in [100, 160].
    ``spacing``: SimpleITK order (image axes i, j, k); default in-plane 0.7-1.0 mm, slices 1.0-3.0 mm.
    ``direction``: 3x3 direction cosines (a signed permutation; row-major as SimpleITK); default drawn from the
    seed (identity, flipped or permuted). ``noise_hu``: Gaussian noise sigma; default drawn in [8, 20].
    ``lesions``: how many lesions of each disease of :data:`DISEASES` to grow (``{"liver": 3, "kidney": 1}``),
    labeled with :data:`LESION_LABELS`; none by default. Fewer are placed when an organ has no room left.
    ``field``: one of :data:`FIELDS`, the abdomen (default: the organ phantoms) or the chest, where the field of
    view is centred on the lungs, the lungs have a parenchyma of their own (:func:`_lung_parenchyma`) and are
    labeled (:data:`LUNG_LABELS`). ``lung_disease``: one of :data:`LUNG_DISEASES` (chest only), painted in
    the lungs and labeled there; none by default.
    """
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; expected one of {sorted(FIELDS)}")
    if lung_disease is not None and (lung_disease not in LUNG_DISEASES or field != "chest"):
        raise ValueError(
            f"lung_disease {lung_disease!r} with field {field!r}; expected one of {sorted(LUNG_DISEASES)} "
            "with field 'chest'"
        )
    f = FIELDS[field]
    for disease, count in (lesions or {}).items():
        if disease not in DISEASES:
            raise ValueError(f"unknown disease {disease!r}; expected one of {sorted(DISEASES)}")
        if int(count) < 0:
            raise ValueError(f"{disease} lesion count must be >= 0, got {count}")
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
    hx, hy, hz = ext / 2.0  # half extents (x: patient left, y: posterior, z: superior)
    if field != "abdomen":  # the body is taller than this field, whose centre sits higher up the body
        hz = hz / f.half_z
        origin[2] += f.centre_z * hz
    g = _grid(size_ijk, spacing_ijk, d, origin)

    def j() -> float:  # size jitter
        return rng.uniform(0.9, 1.1)

    img = np.full(g.shape, AIR_HU, dtype=np.float32)
    lab = np.zeros(g.shape, dtype=np.uint8)

    # body: an ellipsoid long in z (cut by the field of view like a real scan), fat shell over soft tissue
    body_r = (0.88 * hx * j(), 0.80 * hy * j(), f.body_rz * hz)
    body = _ellipsoid(g, (0, 0, 0), body_r)
    fat_mm = rng.uniform(5.0, 10.0)
    inner_r = (body_r[0] - fat_mm, body_r[1] - fat_mm, body_r[2])
    img[body] = rng.uniform(-110, -80)
    inner = _ellipsoid(g, (0, 0, 0), inner_r)
    # soft tissue with a faint texture (muscle, mesentery): the organs are 40-80 HU brighter (docs/study.md)
    img[inner] = (rng.uniform(30, 50) + 4.0 * _texture(g, rng, 15.0))[inner]
    rx, ry = inner_r[0], inner_r[1]

    # lungs (upper part), then organs painted over them; the painting order decides what is visible
    lungs = []
    for side in (-1, 1):
        lung_hu = rng.uniform(-870, -830)
        c = (side * f.lung_c[0] * rx, f.lung_c[1] * ry, f.lung_c[2] * hz)
        r = (f.lung_r[0] * rx * j(), f.lung_r[1] * ry * j(), f.lung_r[2] * hz)
        m = _ellipsoid(g, c, r)
        img[m] = lung_hu
        lungs.append((side, c, r, m, np.float32(lung_hu)))

    # Distractors (label 0) in the liver/spleen HU range, so that no HU interval isolates an organ: the stomach
    # (enhancing wall round fluid and gas) next to the spleen, and bowel loops in the lower abdomen.
    st_c = (0.3 * rx, -0.35 * ry, 0.2 * hz)
    st = _Blob(rng, st_c, (0.3 * rx * j(), 0.3 * ry * j(), 0.22 * hz * j()), wobble=0.15)
    wall_hu = rng.uniform(95, 125)
    img[st.mask(g)] = wall_hu
    img[st.mask(g, 0.8)] = rng.uniform(5, 30)  # fluid content
    img[st.mask(g, 0.8) & (g.y < st_c[1] - 0.55 * st.r[1])] = rng.uniform(-900, -700)  # gas rises anteriorly
    for _ in range(int(rng.integers(6, 11))):
        c = (rng.uniform(-0.6, 0.6) * rx, rng.uniform(-0.7, 0.0) * ry, rng.uniform(-0.9, -0.1) * hz)
        loop = _Blob(rng, c, rng.uniform(0.1, 0.22, size=3) * min(rx, ry), wobble=0.25)
        img[loop.mask(g)] = rng.uniform(80, 130)
        if rng.random() < 0.3:
            img[loop.mask(g, 0.4)] = rng.uniform(-900, -600)  # a gas bubble

    # Labeled organs: smooth random shapes (wobbled, rotated ellipsoids), HU ranges that overlap each other and
    # the distractors, and their own texture (docs/study.md, "The phantoms as a test").
    liver = _Blob(rng, (-0.35 * rx, -0.1 * ry, 0.1 * hz), (0.5 * rx * j(), 0.55 * ry * j(), 0.35 * hz * j()))
    spleen = _Blob(rng, (0.55 * rx, 0.35 * ry, 0.15 * hz), (0.2 * rx * j(), 0.25 * ry * j(), 0.2 * hz * j()))
    organ_hu = {}
    for label, blob, hu, amp, wavelength in (
        (1, liver, rng.uniform(90, 115), 8.0, 12.0),  # mottled parenchyma
        (2, spleen, rng.uniform(95, 125), 3.0, 25.0),  # nearly homogeneous
    ):
        organ_hu[label] = hu
        m, found = blob.mask(g), blob.box(g)
        if found is not None:
            sl, sub = found
            img[sl][m[sl]] = (hu + amp * _texture(sub, rng, wavelength))[m[sl]]
            lab[m] = label
    cortex_hu, medulla_hu = rng.uniform(150, 190), rng.uniform(80, 110)
    kidneys = []
    for side in (-1, 1):
        c = (side * 0.45 * rx, 0.45 * ry, -0.45 * hz + side * 0.03 * hz)
        kidney = _Blob(rng, c, (0.16 * rx * j(), 0.2 * ry * j(), 0.28 * hz * j()), wobble=0.1)
        kidneys.append(kidney)
        m = kidney.mask(g)
        img[m], lab[m] = cortex_hu, 3
        img[kidney.mask(g, 0.65)] = medulla_hu

    # liver vessels (kept in the liver label, as in common annotation protocols)
    lc = liver.c
    for _ in range(3):
        p1 = np.asarray(lc) + rng.uniform(-0.5, 0.5, size=3) * np.asarray(liver.r)
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
    bone_and_vessels = aorta | ivc | spine
    for zk in np.arange(0.0, hz, period):
        rib = (radial**2 + (g.z - zk) ** 2 <= rib_r**2) & (g.y > -0.4 * ry)
        img[rib], lab[rib] = rib_hu, 0
        bone_and_vessels |= rib

    # the chest: a heart over the lungs, then the lungs' own parenchyma, all from the chest's own stream (the
    # organ phantoms never draw from it); a lung is what is left of its ellipsoid at its HU after the anatomy
    chest_rng, chest_lungs = None, ()
    if field == "chest":
        chest_rng = np.random.default_rng(np.random.SeedSequence([seed, _CHEST_STREAM]))
        _heart(chest_rng, g, img, rx, ry, hz)
        chest_lungs = tuple(_Lung(side, c, r, m & (img == hu)) for side, c, r, m, hu in lungs)
        _lung_parenchyma(chest_rng, g, chest_lungs, img)
        for lung in chest_lungs:
            lab[lung.mask] = LUNG_LABELS["lung"]

    # lesions: after the anatomy (so that no later structure hides one), before the blur and the noise; each
    # disease draws from its own stream, which leaves every organ, the noise and the other diseases unchanged
    if lesions or lung_disease is not None:
        anatomy = _Anatomy(
            g,
            inner & ~bone_and_vessels & (lab == 0),
            liver,
            tuple(kidneys),
            organ_hu[1],
            cortex_hu,
            medulla_hu,
            chest_lungs,
        )
        for disease, count in (lesions or {}).items():
            spec = DISEASES[disease]
            spec.grow(
                np.random.SeedSequence([seed, _LESION_STREAM, spec.stream]), anatomy, img, lab, int(count)
            )
        if lung_disease is not None:
            lung_spec = LUNG_DISEASES[lung_disease]
            lung_spec.paint(
                np.random.default_rng(np.random.SeedSequence([seed, _LUNG_DISEASE_STREAM, lung_spec.stream])),
                anatomy,
                img,
                lab,
            )

    # partial volume: the scanner's point-spread function (about 1 mm) blurs every border before the noise
    img = ndimage.gaussian_filter(img, [PSF_MM / s for s in spacing_ijk[::-1]], mode="nearest")
    if noise_hu is not None:
        sigma = noise_hu
    else:  # a chest scan's noise (its dose) varies more: drawn from the chest's stream
        sigma = rng.uniform(8.0, 20.0) if chest_rng is None else chest_rng.uniform(*CHEST_NOISE_HU)
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


# --- lesions: one function per disease, each on its own seed stream (docs/tumours.md) ------------------------

#: entropy word of the lesion streams: ``SeedSequence([case seed, _LESION_STREAM, disease stream])``
_LESION_STREAM = 1_000_033


@dataclass
class _Anatomy:
    """What a disease needs of the phantom it grows in (physical mm, HU drawn for this case)."""

    grid: _Grid
    soft_tissue: np.ndarray  # unlabeled soft tissue a mass may grow into: no bone, vessel, fat, air or organ
    liver: _Blob
    kidneys: tuple[_Blob, ...]
    liver_hu: float
    cortex_hu: float
    medulla_hu: float
    lungs: tuple[_Lung, ...] = ()  # the chest's lungs (field "chest"), right then left; none in the abdomen


def _point_in(blob: _Blob, p, scale: float = 1.0) -> bool:
    """Whether the physical point ``p`` lies in ``blob`` shrunk by ``scale`` (no grid needed)."""
    g = _Grid(*(np.full((1, 1, 1), v, np.float32) for v in p), (1, 1, 1))
    return bool(blob._inside(g, scale)[0, 0, 0])


def _lands_in(g: _Grid, region: np.ndarray, p, half_mm: float = 1.5) -> bool:
    """Whether every voxel within ``half_mm`` of the point ``p`` lies in ``region``: a lesion centred there is
    not hidden under a vessel, a rib or a neighbouring organ, so that it paints at least its core."""
    found = g.box(p, (half_mm,) * 3)
    return found is not None and bool(region[found[0]].all())


def _reach(blob: _Blob) -> float:
    return max(blob.r) * (1.0 + float(blob.amps.sum()))


def _place(blob: _Blob, candidates, placed: list, gap_mm: float = 2.0) -> bool:
    """Move ``blob`` to the first candidate centre clear of the lesions in ``placed`` (then add it there).

    Lesions never touch, so that each one is its own connected component, as lesion-wise scores count them.
    """
    reach = _reach(blob)
    for p in candidates:
        if all(np.linalg.norm(p - q) >= reach + r + gap_mm for q, r in placed):
            blob.c = tuple(float(v) for v in p)
            placed.append((p, reach))
            return True
    return False


def _surface_point(rng: np.random.Generator, blob: _Blob) -> tuple[np.ndarray, np.ndarray]:
    """A random point of ``blob``'s ellipsoid (its rotation, not its wobble) and the unit vector out to it."""
    v = rng.normal(size=3)
    u = v / np.linalg.norm(v) * np.asarray(blob.r)  # on the ellipsoid, in the blob's own (rotated) frame
    ca, sa = np.cos(blob.angle), np.sin(blob.angle)
    w = np.array([ca * u[0] - sa * u[1], sa * u[0] + ca * u[1], u[2]])
    return np.asarray(blob.c) + w, w / np.linalg.norm(w)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Diameters: log-uniform, so that small lesions (the hard ones) are as common per octave as large ones."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo)))))


def _liver_lesions(seeds: np.random.SeedSequence, a: _Anatomy, img, lab, n: int) -> None:
    """Up to ``n`` liver lesions, labeled ``liver_tumour``, inside the liver label only.

    Metastasis- or HCC-like: 60 % hypo-attenuating (60-85 HU under the parenchyma), 40 % hyper-attenuating
    (60-85 HU over it); 5-40 mm, at most 70 % of the liver's smallest diameter (the phantom liver is 30-75 mm
    across); round to lobulated (wobble 0.05-0.35). A third of the hypo ones >= 14 mm have an enhancing rim, a third
    of the others >= 12 mm a necrotic (0-20 HU) core. Each lesion draws from its own child stream.
    """
    liver = a.liver
    cap = min(40.0, 0.7 * 2.0 * min(liver.r))
    parenchyma = lab == LABELS["liver"]
    placed: list = []
    for child in seeds.spawn(n):
        rng = np.random.default_rng(child)
        d = _log_uniform(rng, 5.0, cap)
        blob = _Blob(rng, liver.c, d / 2.0 * rng.uniform(0.85, 1.15, size=3), wobble=rng.uniform(0.05, 0.35))
        hyper = bool(rng.random() < 0.4)
        hu = a.liver_hu + (1.0 if hyper else -1.0) * rng.uniform(60.0, 85.0)
        u_rim, u_core = rng.random(2)
        rim_mm, rim_hu = min(rng.uniform(1.5, 3.0), d / 8.0), a.liver_hu + rng.uniform(45.0, 70.0)
        core_scale, core_hu = rng.uniform(0.35, 0.6), rng.uniform(0.0, 20.0)
        rim = not hyper and d >= 14.0 and u_rim < 0.35  # a rim thinner than a quarter of the radius
        core = not rim and d >= 12.0 and u_core < 0.35
        # centres in the liver shrunk to 80 %: a lesion may reach the capsule but not sit outside it
        centres = (
            p
            for p in (np.asarray(liver.c) + rng.uniform(-1, 1, 3) * np.asarray(liver.r) for _ in range(200))
            if _point_in(liver, p, 0.8) and _lands_in(a.grid, parenchyma, p)
        )
        if not _place(blob, centres, placed):
            continue  # no room left in this liver
        found = blob.box(a.grid)
        if found is None:
            continue
        sl, sub = found
        m = blob._inside(sub, 1.0) & (lab[sl] == LABELS["liver"])
        values = hu + 6.0 * _texture(sub, rng, 8.0)
        if rim:
            values = np.where(blob._inside(sub, max(0.2, 1.0 - rim_mm / (d / 2.0))), values, rim_hu)
        if core:
            values = np.where(blob._inside(sub, core_scale), core_hu, values)
        img[sl][m] = values[m]
        lab[sl][m] = LESION_LABELS["liver_tumour"]


def _mass_centre(
    rng: np.random.Generator, kidney: _Blob, radius: float, exophytic: bool
) -> np.ndarray | None:
    """A candidate centre of a kidney mass of ``radius`` (mm), or None where it is not the kind asked for.

    In the cortex: at 80-95 % of the way from the kidney's centre to its surface. Exophytic: 10-60 % of its
    radius beyond the surface, its centre outside the kidney and its inner side (80 % of the radius in) inside,
    so that it bulges out of the kidney and never floats beside it.
    """
    s, out = _surface_point(rng, kidney)
    if not exophytic:
        p = np.asarray(kidney.c) + (s - np.asarray(kidney.c)) * rng.uniform(0.8, 0.95)
        return p if _point_in(kidney, p) else None
    p = s + out * rng.uniform(0.1, 0.6) * radius
    return p if _point_in(kidney, p - out * 0.8 * radius) and not _point_in(kidney, p) else None


def _kidney_masses(seeds: np.random.SeedSequence, a: _Anatomy, img, lab, n: int) -> None:
    """Up to ``n`` kidney masses, the KiTS distinction: solid tumours (60 %) and cysts (40 %).

    Tumour: heterogeneous (8 HU texture, 10 mm; a necrotic 10-30 HU core in 40 % of those >= 10 mm), wobble
    0.1-0.3, hypo-enhancing: 50-65 HU under the medulla (so >= 90 under the cortex), 15-60 HU, i.e. near the
    soft tissue an exophytic one bulges into (measured: docs/tumours.md). Cyst: near water (0-15 HU), homogeneous,
    round, a 0.8 mm enhancing wall. Half of the masses lie in the cortex (clipped to the kidney label), half are
    exophytic (most of the mass bulges into the unlabeled soft tissue, never into another organ, a vessel or
    bone), see :func:`_mass_centre`. Diameter 5-30 mm, at most 1.6 times the kidney's smallest radius. Each
    mass draws from its own child stream.
    """
    placed: list = []
    parenchyma = lab == LABELS["kidneys"]
    around = parenchyma | a.soft_tissue
    for child in seeds.spawn(n):
        rng = np.random.default_rng(child)
        kidney = a.kidneys[int(rng.integers(len(a.kidneys)))]
        cyst = bool(rng.random() < 0.4)
        exophytic = bool(rng.random() < 0.5)
        d = _log_uniform(rng, 5.0, min(30.0, 1.6 * min(kidney.r)))
        wobble = 0.03 if cyst else rng.uniform(0.1, 0.3)
        blob = _Blob(rng, kidney.c, d / 2.0 * rng.uniform(0.9, 1.1, size=3), wobble=wobble)
        tumour_hu = a.medulla_hu - rng.uniform(50.0, 65.0)
        necrosis = bool(rng.random() < 0.4) and d >= 10.0
        core_scale, core_hu = rng.uniform(0.3, 0.55), rng.uniform(10.0, 30.0)
        fluid_hu, wall_hu = rng.uniform(0.0, 15.0), a.cortex_hu - rng.uniform(20.0, 50.0)
        tissue = around if exophytic else parenchyma
        tries = (_mass_centre(rng, kidney, min(blob.r), exophytic) for _ in range(100))
        centres = (p for p in tries if p is not None and _lands_in(a.grid, tissue, p))
        if not _place(blob, centres, placed):
            continue
        found = blob.box(a.grid)
        if found is None:
            continue
        sl, sub = found
        host = lab[sl] == LABELS["kidneys"]
        m = blob._inside(sub, 1.0) & ((host | a.soft_tissue[sl]) if exophytic else host)
        if cyst:
            values = np.where(blob._inside(sub, max(0.2, 1.0 - 0.8 / (d / 2.0))), fluid_hu, wall_hu)
            value = LESION_LABELS["kidney_cyst"]
        else:
            values = tumour_hu + 8.0 * _texture(sub, rng, 10.0)
            if necrosis:
                values = np.where(blob._inside(sub, core_scale), core_hu, values)
            value = LESION_LABELS["kidney_tumour"]
        img[sl][m] = values[m]
        lab[sl][m] = value


@dataclass(frozen=True)
class Disease:
    """A lesion type a phantom can carry: its seed stream, how many a tumour task's case draws, its painter."""

    stream: int
    max_lesions: int
    grow: Callable[[np.random.SeedSequence, _Anatomy, np.ndarray, np.ndarray, int], None]


#: the diseases of :func:`make_phantom`'s ``lesions`` (a new one: a painter function and a row here)
DISEASES = {
    "liver": Disease(stream=1, max_lesions=4, grow=_liver_lesions),
    "kidney": Disease(stream=2, max_lesions=3, grow=_kidney_masses),
}


# --- the chest: its lungs and the case-level lung diseases (docs/classification.md, "The phantoms") ----------

#: entropy words of the chest's stream (heart, lung parenchyma, noise) and of the lung diseases' streams:
#: ``SeedSequence([case seed, _CHEST_STREAM])``, ``SeedSequence([case seed, _LUNG_DISEASE_STREAM, stream])``
_CHEST_STREAM = 1_000_037
_LUNG_DISEASE_STREAM = 1_000_039
#: a chest phantom's noise sigma (HU), drawn per case: low-dose to standard-dose chest CT
CHEST_NOISE_HU = (8.0, 35.0)
#: HU under which a lung voxel is aerated parenchyma (ground glass raises only those; vessels stay visible)
AERATED_HU = -400.0


@dataclass(frozen=True)
class _Lung:
    """One lung of a chest phantom: its ellipsoid (physical mm) and its voxels, what the anatomy left of it."""

    side: int  # -1: the right lung (the patient's right is -x in LPS), +1: the left
    c: tuple[float, float, float]
    r: tuple[float, float, float]
    mask: np.ndarray

    def box(self, g: _Grid) -> tuple[tuple[slice, ...], _Grid] | None:
        return g.box(self.c, self.r)

    def coords(self, g: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ellipsoid's own coordinates (u: to the patient's left, v: posterior, w: superior; 1: surface)."""
        return tuple((q - c) / r for q, c, r in zip((g.x, g.y, g.z), self.c, self.r))

    def hilum(self) -> np.ndarray:
        """Where its airways and vessels enter: medial, a little posterior, at mid-height."""
        return np.asarray(self.c) + np.array([-self.side * 0.55, 0.1, 0.0]) * np.asarray(self.r)

    def point(self, rng: np.random.Generator, rho: float) -> np.ndarray:
        """A random point at the fraction ``rho`` of the way from its centre to its surface."""
        n = rng.normal(size=3)
        return np.asarray(self.c) + rho * n / np.linalg.norm(n) * np.asarray(self.r)


def _tube(g: _Grid, p0, p1, radius: float) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """:func:`_segment_tube` evaluated in the segment's bounding box only: (numpy slices, its voxels there)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    found = g.box((p0 + p1) / 2.0, np.abs(p1 - p0) / 2.0 + radius)
    if found is None:
        return None
    sl, sub = found
    return sl, _segment_tube(sub, p0, p1, radius)


def _heart(rng: np.random.Generator, g: _Grid, img: np.ndarray, rx: float, ry: float, hz: float) -> None:
    """A chest phantom's heart, anterior and left of the midline over the lungs: myocardium round blood."""
    c = (0.15 * rx, -0.3 * ry, 0.35 * hz)
    heart = _Blob(rng, c, np.array([0.3 * rx, 0.32 * ry, 0.2 * hz]) * rng.uniform(0.9, 1.1, 3), wobble=0.1)
    img[heart.mask(g)] = rng.uniform(90.0, 130.0)
    img[heart.mask(g, 0.7)] = rng.uniform(150.0, 250.0)  # the contrast-filled chambers


def _lung_parenchyma(rng: np.random.Generator, g: _Grid, lungs: tuple[_Lung, ...], img: np.ndarray) -> None:
    """The normal lungs of a chest phantom, in the ways normal chest CTs differ, drawn per case for every class.

    Parenchyma -900..-780 HU (inspiration, technique; +-10 HU per lung) with a 10 HU texture (10 mm); a
    dependent density gradient, 0-150 HU more at the posterior surface (quadratic in depth); 4-8 vessels from
    the hilum to 55-75 % of the way out, each with 2-3 branches towards the periphery (radius 1.2-2.0 mm and
    0.6-1.1 mm, times 0.8-1.3 per case; 30-200 HU); in half the cases dependent atelectasis, a band of 2-10 mm
    along the posterior pleura of both lungs at -350..0 HU; in a third, emphysema, 8-40 spots of 5-14 mm at
    -990..-950 HU in the upper two thirds. Together they overlap what the diseases do to the global lung HU
    (docs/classification.md, "The phantoms").
    """
    base, gradient = rng.uniform(-900.0, -780.0), rng.uniform(0.0, 150.0)
    vessel_hu, vessel_scale = rng.uniform(30.0, 200.0), rng.uniform(0.8, 1.3)
    n_vessels = int(rng.integers(4, 9))
    band_mm = rng.uniform(2.0, 10.0) if rng.random() < 0.5 else 0.0
    band_hu = rng.uniform(-350.0, 0.0)
    n_spots = int(rng.integers(8, 41)) if rng.random() < 1.0 / 3.0 else 0
    for lung in lungs:
        found = lung.box(g)
        if found is None:
            continue
        sl, sub = found
        u, v, w = lung.coords(sub)
        depth = np.clip(1.0 - v, 0.0, 2.0) / 2.0  # 0 at the posterior surface, 1 at the anterior one
        values = base + rng.uniform(-10.0, 10.0) + 10.0 * _texture(sub, rng, 10.0)
        values = values + gradient * (1.0 - depth) ** 2
        if band_mm:  # depth under the posterior surface along y, in mm
            under = (np.sqrt(np.clip(1.0 - u**2 - w**2, 0.0, None)) - v) * lung.r[1]
            values = np.where((under < band_mm * rng.uniform(0.7, 1.3)) & (v > 0), band_hu, values)
        m = lung.mask[sl]
        img[sl][m] = values[m]
        for _ in range(n_spots // len(lungs)):
            p, radius = lung.point(rng, rng.uniform(0.0, 0.85)), rng.uniform(2.5, 7.0)
            p[2] = max(p[2], lung.c[2] - 0.3 * lung.r[2])  # the upper two thirds
            found = g.box(p, (radius,) * 3)
            if found is not None:
                spot = _ellipsoid(found[1], p, (radius,) * 3) & lung.mask[found[0]]
                img[found[0]][spot] = rng.uniform(-990.0, -950.0)
        for _ in range(n_vessels):
            end = lung.point(rng, rng.uniform(0.55, 0.75))
            branches = [(lung.hilum(), end, rng.uniform(1.2, 2.0))]
            for _ in range(int(rng.integers(2, 4))):
                tip = end + rng.uniform(-0.35, 0.35, 3) * np.asarray(lung.r)
                branches.append((end, tip, rng.uniform(0.6, 1.1)))
            for p0, p1, radius in branches:
                found = _tube(g, p0, p1, radius * vessel_scale)
                if found is not None:
                    img[found[0]][found[1] & lung.mask[found[0]]] = vessel_hu


def _at(sub: _Grid, mask: np.ndarray, p) -> bool:
    """Whether the voxel of the sub-grid ``sub`` nearest the physical point ``p`` is in ``mask``."""
    index = [0, 0, 0]
    for q, coord in enumerate((sub.x, sub.y, sub.z)):
        index[int(np.argmax(coord.shape))] = int(np.argmin(np.abs(coord.ravel() - p[q])))
    return bool(mask[tuple(index)])


def _point_at(
    rng: np.random.Generator, sub: _Grid, mask: np.ndarray, c, half, tries: int = 500
) -> np.ndarray | None:
    """A random physical point within ``half`` (mm) of ``c`` whose nearest voxel is in ``mask``, or None.

    Drawn in mm, not among the voxels, so that the same seed picks the same point on any grid."""
    for _ in range(tries):
        p = np.asarray(c) + rng.uniform(-1.0, 1.0, 3) * np.asarray(half)
        if _at(sub, mask, p):
            return p
    return None


def _lobe(lung: _Lung, sub: _Grid, rng: np.random.Generator) -> np.ndarray:
    """One lobe of ``lung`` on the sub-grid, drawn: right upper, middle or lower, left upper or lower.

    The fissures are planes in the lung's own coordinates, jittered per case: the oblique one rises from the
    anterior base to the posterior apex (w = 0.7..1.1 v -0.15..0.15), the horizontal one (right lung) cuts the
    part in front of it at w = 0.05..0.3.
    """
    _, v, w = lung.coords(sub)
    below = w < rng.uniform(0.7, 1.1) * v + rng.uniform(-0.15, 0.15)
    horizontal = rng.uniform(0.05, 0.3)
    lobes = {"lower": below, "upper": ~below & (w >= horizontal if lung.side < 0 else True)}
    if lung.side < 0:
        lobes["middle"] = ~below & (w < horizontal)
    return np.broadcast_to(list(lobes.values())[int(rng.integers(len(lobes)))], sub.shape)


def _lobar_consolidation(rng: np.random.Generator, a: _Anatomy, img: np.ndarray, lab: np.ndarray) -> None:
    """Common (bacterial) pneumonia: one lobe of one lung, or part of it, consolidated (label consolidation).

    Per case: a lung and a lobe (:func:`_lobe`; one the anatomy left at least a tenth of its lung); the share
    of the lobe, 20-100 %, spreading from a random point of it (the nearest voxels by a wobbled distance, so that
    its edge is irregular except along the fissure, which it never crosses; one connected region, the largest
    where the anatomy cuts it in pieces); how dense, -200..+40 HU with a 12 HU
    texture (8 mm), hiding the vessels; a 3 mm feathered edge against aerated lung; 3-7 air bronchograms,
    air-filled tubes (-950..-850 HU, radius 0.8-1.6 mm) from the hilum into it, visible only inside it.
    """
    for _ in range(20):  # a lobe the anatomy left at least a tenth of its lung (not hidden under the liver)
        lung = a.lungs[int(rng.integers(len(a.lungs)))]
        found = lung.box(a.grid)
        if found is None:
            continue
        sl, sub = found
        region = lung.mask[sl] & _lobe(lung, sub, rng)
        if region.sum() >= max(8, 0.1 * lung.mask.sum()):
            break
    else:
        raise ValueError("no lobe of this chest phantom has room for a consolidation; is its field too small?")
    share, hu = rng.uniform(0.2, 1.0), rng.uniform(-200.0, 40.0)
    start = _point_at(rng, sub, region, lung.c, lung.r)
    if start is None:
        raise ValueError(f"found no point of a lobe of {int(region.sum())} voxels in 500 tries")
    spread = _Blob(rng, start, 0.5 * np.asarray(lung.r), wobble=0.3)
    rho, edge = spread._radius(sub)
    q = np.broadcast_to(rho / edge, sub.shape)
    cut = float(np.quantile(q[region], share))
    parts, n = ndimage.label(region & (q <= cut), np.ones((3, 3, 3)))
    # one region: where a rib, a vessel's gap or the liver dome cuts it in pieces, only the largest
    inside = parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:])) if n > 1 else parts > 0
    feather = np.clip((cut - q) / (3.0 / (0.5 * float(np.mean(lung.r)))), 0.0, 1.0)
    box = img[sl]
    values = hu + 12.0 * _texture(sub, rng, 8.0)
    box[inside] = (box + feather * (values - box))[inside]
    core = inside & (q <= 0.9 * cut)
    for _ in range(int(rng.integers(3, 8))):
        end = _point_at(rng, sub, core, lung.c, lung.r)
        radius, air_hu = rng.uniform(0.8, 1.6), rng.uniform(-950.0, -850.0)
        if end is not None:
            box[_segment_tube(sub, lung.hilum(), end, radius) & core] = air_hu
    lab[sl][inside] = LUNG_LABELS["consolidation"]


def _peripheral_ground_glass(rng: np.random.Generator, a: _Anatomy, img: np.ndarray, lab: np.ndarray) -> None:
    """COVID-19 pneumonia: bilateral, multifocal, peripheral ground-glass opacities (label ground_glass).

    Per case: the share of the lungs to involve, 3-35 %; how faint, +120..+320 HU over the parenchyma (x 0.8-1.2
    per patch); how many patches get a consolidating core (-350..-150 HU, the inner 45 % of a patch of >= 6 mm
    radius): 0-50 %, the severe cases. Patches alternate between the right and the left lung (at least two in
    each) until that share is labeled: a wobbled blob of 4-12 mm radius whose centre lies 30-80 % of its radius
    inside the lung's surface, at a point of its lateral, posterior or basal side (never the mediastinal one;
    posterior and basal ones twice as likely as anterior and apical ones); a hazy edge (the opacity fades over
    the outer 40 % of its radius; all of it labeled); only aerated voxels (< -400 HU) are raised,
    so the vessels stay visible through it.
    """
    share, lift_hu, p_core = rng.uniform(0.03, 0.35), rng.uniform(120.0, 320.0), rng.uniform(0.0, 0.5)
    total = sum(int(lung.mask.sum()) for lung in a.lungs)
    before = img.copy()
    painted, per_lung = 0, [0] * len(a.lungs)
    for _ in range(400):
        if painted >= share * total and min(per_lung) >= 2:
            break
        k = int(np.argmin(per_lung)) if min(per_lung) < 2 else sum(per_lung) % len(a.lungs)
        lung = a.lungs[k]
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        # not the mediastinal side; posterior (+v) and basal (-w) sides favoured
        if -lung.side * n[0] > 0.3 or rng.random() > 0.5 + 0.25 * (n[1] - n[2]):
            continue
        radius = rng.uniform(4.0, 12.0)
        surface = n * np.asarray(lung.r)
        inset = radius * rng.uniform(0.3, 0.8)  # mm inside the surface
        centre = np.asarray(lung.c) + surface * (1.0 - inset / np.linalg.norm(surface))
        blob = _Blob(rng, centre, radius * rng.uniform(0.8, 1.2, 3), wobble=0.3)
        lift, core = lift_hu * rng.uniform(0.8, 1.2), radius >= 6.0 and rng.random() < p_core
        core_hu = rng.uniform(-350.0, -150.0)
        found = blob.box(a.grid)
        if found is None:
            continue
        sl, sub = found
        rho, edge = blob._radius(sub)
        q = np.broadcast_to(rho / edge, sub.shape)
        m = (q <= 1.0) & lung.mask[sl]
        raised = m & (before[sl] < AERATED_HU)
        target = before[sl] + lift * np.clip((1.0 - q) / 0.4, 0.0, 1.0)
        img[sl][raised] = np.maximum(img[sl], target)[raised]
        if core:
            img[sl][raised & (q <= 0.45)] = np.maximum(img[sl], core_hu)[raised & (q <= 0.45)]
        new = int((m & (lab[sl] != LUNG_LABELS["ground_glass"])).sum())
        if new == 0:
            continue
        lab[sl][m] = LUNG_LABELS["ground_glass"]
        painted, per_lung[k] = painted + new, per_lung[k] + 1


@dataclass(frozen=True)
class LungDisease:
    """A case-level lung disease of the chest phantoms: its seed stream and the function that paints it."""

    stream: int
    paint: Callable[[np.random.Generator, _Anatomy, np.ndarray, np.ndarray], None]


#: the diseases of :func:`make_phantom`'s ``lung_disease`` (field "chest"; a new one: a painter and a row here)
LUNG_DISEASES = {
    "lobar_consolidation": LungDisease(stream=1, paint=_lobar_consolidation),
    "peripheral_ground_glass": LungDisease(stream=2, paint=_peripheral_ground_glass),
}


def write_unlabeled_corpus(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    field: str = "abdomen",
) -> list[Path]:
    """Write ``n`` unlabeled phantoms ``phantom_XXXX.nii.gz`` into ``out_dir``; returns their paths.

    ``shape_mm`` / ``spacing`` fix the extent / spacing of every case (default: drawn per case). ``field``: the
    abdomen (default: the organ phantoms) or the chest (:data:`FIELDS`), an unlabeled chest corpus for
    pre-training a classifier's encoder: its lungs are normal or carry one of :data:`LUNG_DISEASES`, in the
    proportions of the cc-ccii dataset's classes (:func:`case_classes` on the corpus's seed stream), with the
    disease recorded nowhere, as a hospital's unlabeled chest CT holds sick and healthy lungs alike.
    """
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; expected one of {sorted(FIELDS)}")
    diseases: list[str | None] = [None] * n
    if field == "chest":
        t = CLASSIFICATION_TASKS["cc-ccii"]
        diseases = [t.classes[c] for c in case_classes("cc-ccii", seed, 0, n)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image, _ = make_phantom(
            _stream_seed(seed, 0, i), shape_mm, spacing, labels=False, field=field, lung_disease=diseases[i]
        )
        p = out / f"phantom_{i:04d}.nii.gz"
        sitk.WriteImage(image, str(p), useCompression=True)
        paths.append(p)
    return paths


@dataclass(frozen=True)
class Task:
    """A labeled dataset the generator writes: its default name and id, the disease its cases carry, its labels."""

    name: str
    dataset_id: int
    labels: dict  # dataset.json "labels"; a list is a region (nnU-Net region-based training)
    relabel: dict[int, int] | None  # phantom label value -> the dataset's (any other -> 0); None: as they are
    case: str  # case name, formatted with name, split ("tr"/"ts"), i (index in its split), n (over both)
    disease: str | None = None  # of DISEASES: cases carry 1..max_lesions of it, the lesion-free ones none
    regions_class_order: tuple[int, ...] | None = None


#: the labeled datasets of :func:`write_nnunet_dataset` (``mim_nnunet_phantoms dataset --task``)
TASKS = {
    "organs": Task("MiMPhantom", 990, LABELS, None, "{name}_{split}{i:03d}"),
    # KiTS23: values kidney 1, tumour 2, cyst 3, trained as the regions it is scored on (kidney and masses,
    # masses, tumour), in the form of nnU-Net's Dataset220_KiTS2023 dataset.json; case names as KiTS23's
    "kits": Task(
        "KiTSPhantom",
        993,
        {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
        {LABELS["kidneys"]: 1, LESION_LABELS["kidney_tumour"]: 2, LESION_LABELS["kidney_cyst"]: 3},
        "case_{n:05d}",
        disease="kidney",
        regions_class_order=(1, 3, 2),
    ),
    # MSD Task03_Liver: liver 1, tumour 2 (its dataset.json calls the tumour "cancer"); case names as MSD's
    "liver-tumour": Task(
        "LiverTumourPhantom",
        994,
        {"background": 0, "liver": 1, "cancer": 2},
        {LABELS["liver"]: 1, LESION_LABELS["liver_tumour"]: 2},
        "liver_{n}",
        disease="liver",
    ),
}

#: share of a tumour task's cases (per split, rounded half up) without any lesion, as in real tumour datasets
LESION_FREE_FRACTION = 0.25
#: entropy word of the per-split choice of the lesion-free cases and the lesion counts
_COUNT_STREAM = 1_000_003


def lesion_counts(task: str, seed: int, stream: int, count: int) -> list[dict[str, int] | None]:
    """The ``lesions`` argument of :func:`make_phantom` for each case of one split of a task.

    ``round(count * LESION_FREE_FRACTION)`` cases (half up), chosen by the seed, get none; the others 1 to the
    disease's ``max_lesions``. ``None`` for every case of a task without disease (the organ phantoms).
    """
    disease = TASKS[task].disease
    if disease is None:
        return [None] * count
    rng = np.random.default_rng(np.random.SeedSequence([seed, _COUNT_STREAM, stream]))
    free = set(rng.permutation(count)[: int(np.floor(count * LESION_FREE_FRACTION + 0.5))].tolist())
    top = DISEASES[disease].max_lesions
    return [{disease: 0 if i in free else int(rng.integers(1, top + 1))} for i in range(count)]


def _relabel(label: sitk.Image, table: dict[int, int]) -> sitk.Image:
    lut = np.zeros(256, np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    out = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(label)])
    out.CopyInformation(label)
    return out


def write_nnunet_dataset(
    raw_root: str | Path,
    dataset_id: int | None = None,
    name: str | None = None,
    n_train: int = 8,
    n_test: int = 2,
    seed: int = 0,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    task: str = "organs",
) -> Path:
    """A labeled nnU-Net v2 raw dataset ``raw_root/DatasetXXX_Name`` (imagesTr/labelsTr/imagesTs/labelsTs).

    ``task`` names one of :data:`TASKS`: ``organs`` (labels :data:`LABELS`, the default), ``kits`` (kidney 1,
    tumour 2, cyst 3 as KiTS23, with its regions) or ``liver-tumour`` (liver 1, tumour 2 as MSD Task03);
    ``dataset_id`` and ``name`` default to the task's. Case i of a split is the same organ phantom in every task
    (a tumour task adds its lesions, :func:`lesion_counts`). Training and test cases use seed streams distinct
    from :func:`write_unlabeled_corpus`, so a corpus and a dataset with the same seed share no case.
    ``shape_mm`` / ``spacing`` as in :func:`write_unlabeled_corpus`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    t = TASKS[task]
    dataset_id = t.dataset_id if dataset_id is None else dataset_id
    name = t.name if name is None else name
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for split, count, stream, first in (("Tr", n_train, 1, 0), ("Ts", n_test, 2, n_train)):
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for i, lesions in enumerate(lesion_counts(task, seed, stream, count)):
            case = t.case.format(name=name, split=split.lower(), i=i, n=first + i)
            image, label = make_phantom(
                _stream_seed(seed, stream, i), shape_mm, spacing, labels=True, lesions=lesions
            )
            if t.relabel is not None:
                label = _relabel(label, t.relabel)
            sitk.WriteImage(
                image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"), useCompression=True
            )
            sitk.WriteImage(label, str(folder / f"labels{split}" / f"{case}.nii.gz"), useCompression=True)
    description = f"Synthetic CT phantoms generated by mim_nnunet.data.phantoms (seed {seed})"
    if t.disease is not None:
        description += f", task {task}: {t.disease} lesions, a quarter of the cases without"
    dataset_json = {
        "name": name,
        "description": description,
        "channel_names": {"0": "CT"},
        "labels": t.labels,
        **({"regions_class_order": list(t.regions_class_order)} if t.regions_class_order else {}),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "licence": "CC0 (synthetic)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


@dataclass(frozen=True)
class ClassificationTask:
    """A case-level classification dataset the generator writes: its default name and id, its classes in order
    (a class's index is its position) and the lung disease of :data:`LUNG_DISEASES` each one paints."""

    name: str
    dataset_id: int
    classes: dict[str, str | None]  # class name -> lung disease (None: normal lungs)
    case: str  # case name, formatted with name, split ("tr"/"ts"), i (index in its split), n (over both)
    field: str = "chest"


#: the classification datasets of :func:`write_classification_dataset` (``mim_nnunet_phantoms dataset --task``)
CLASSIFICATION_TASKS = {
    # CC-CCII: normal lungs, common pneumonia, COVID-19 pneumonia (docs/classification.md)
    "cc-ccii": ClassificationTask(
        "ChestPhantom",
        995,
        {
            "normal": None,
            "common_pneumonia": "lobar_consolidation",
            "covid19_pneumonia": "peripheral_ground_glass",
        },
        "{name}_{split}{i:03d}",
    ),
}
#: entropy word of the per-split order of the classes
_CLASS_STREAM = 1_000_041


def case_classes(task: str, seed: int, stream: int, count: int) -> list[str]:
    """The class of each case of one split of a classification task: balanced (the classes' counts differ by at
    most one, the first classes taking the remainder), in an order drawn from the seed."""
    names = list(CLASSIFICATION_TASKS[task].classes)
    order = np.random.default_rng(np.random.SeedSequence([seed, _CLASS_STREAM, stream])).permutation(count)
    return [names[int(k) % len(names)] for k in order]


def write_classification_dataset(
    raw_root: str | Path,
    dataset_id: int | None = None,
    name: str | None = None,
    n_train: int = 9,
    n_test: int = 3,
    seed: int = 0,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    task: str = "cc-ccii",
) -> Path:
    """A classification dataset ``raw_root/DatasetXXX_Name`` in the nnU-Net raw layout, without labels.

    ``imagesTr/CASE_0000.nii.gz`` and ``imagesTs/CASE_0000.nii.gz``; ``classesTr.csv`` and ``classesTs.csv``
    (header ``case,class``, the class by name); ``dataset.json`` with nnU-Net's keys (``channel_names``,
    ``file_ending``, ``numTraining``, ``name``) and ``classes``, the class names in index order. ``task`` names
    one of :data:`CLASSIFICATION_TASKS`; the classes are balanced per split (:func:`case_classes`). Seed streams
    as :func:`write_nnunet_dataset`'s; ``shape_mm`` / ``spacing`` as in :func:`write_unlabeled_corpus`.
    """
    if task not in CLASSIFICATION_TASKS:
        raise ValueError(
            f"unknown classification task {task!r}; expected one of {sorted(CLASSIFICATION_TASKS)}"
        )
    t = CLASSIFICATION_TASKS[task]
    dataset_id = t.dataset_id if dataset_id is None else dataset_id
    name = t.name if name is None else name
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for split, count, stream, first in (("Tr", n_train, 1, 0), ("Ts", n_test, 2, n_train)):
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        rows = ["case,class"]
        classes = case_classes(task, seed, stream, count)
        for i, cls in enumerate(tqdm(classes, desc=f"{name} images{split}", unit="case", leave=False)):
            case = t.case.format(name=name, split=split.lower(), i=i, n=first + i)
            image, _ = make_phantom(
                _stream_seed(seed, stream, i),
                shape_mm,
                spacing,
                labels=False,
                field=t.field,
                lung_disease=t.classes[cls],
            )
            sitk.WriteImage(
                image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"), useCompression=True
            )
            rows.append(f"{case},{cls}")
        (folder / f"classes{split}.csv").write_text("\n".join(rows) + "\n")
    dataset_json = {
        "name": name,
        "description": f"Synthetic chest CT phantoms generated by mim_nnunet.data.phantoms (seed {seed}), "
        f"task {task}: one case-level class per case, classes{{Tr,Ts}}.csv",
        "channel_names": {"0": "CT"},
        "classes": list(t.classes),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "licence": "CC0 (synthetic)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


# --- is each organ a fair test? (visible to a network, not found by a threshold) ---------------------------


def organ_cnr(image: np.ndarray, label: np.ndarray, organ: int, spacing_zyx, shell_mm: float = 4.0) -> float:
    """Contrast-to-noise ratio of one labeled organ against its surroundings.

    Contrast: |median HU inside the organ (>= 2 mm from its border) - median HU of a ``shell_mm`` shell around
    it| (medians, so that a rib or a vessel in the shell does not dominate). Noise: the robust sigma of the
    voxel-to-voxel differences inside the organ, divided by sqrt(2): white noise counts, a smooth texture or the
    cortex/medulla step does not. Partial-volume blur happens before the noise, so it does not lower it.
    """
    mask = label == organ
    if mask.sum() < 8:
        raise ValueError(f"organ {organ} has {int(mask.sum())} voxels; cannot measure its contrast")
    sampling = [float(s) for s in spacing_zyx]
    inside = ndimage.distance_transform_edt(mask, sampling=sampling) >= 2.0
    if inside.sum() < 8:
        inside = mask
    outside_dist = ndimage.distance_transform_edt(~mask, sampling=sampling)
    shell = (outside_dist > 0) & (outside_dist <= shell_mm)
    img = image.astype(np.float32)
    contrast = abs(float(np.median(img[inside])) - float(np.median(img[shell])))
    # differences along the first array axis whose both voxels lie inside the organ
    noise = _noise_sigma(_pair_differences(img, inside, 0))
    return contrast / max(noise, 1e-6)


def _pair_differences(img: np.ndarray, region: np.ndarray, axis: int) -> np.ndarray:
    """Differences of neighbouring voxels along ``axis`` whose both voxels lie in ``region``."""
    a, b = [slice(None)] * img.ndim, [slice(None)] * img.ndim
    a[axis], b[axis] = slice(1, None), slice(None, -1)
    a, b = tuple(a), tuple(b)
    return (img[a] - img[b])[region[a] & region[b]]


def _noise_sigma(diff: np.ndarray) -> float:
    """White-noise sigma from neighbour differences: their robust sigma (1.4826 MAD) over sqrt(2)."""
    return 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2.0)


def best_threshold_dice(image: np.ndarray, label: np.ndarray, organ: int, bin_hu: float = 5.0) -> float:
    """The best Dice that a single HU interval [lo, hi] (searched on a ``bin_hu`` grid) reaches for one organ.

    A threshold segments the whole image, so every unlabeled structure in the interval counts as a false
    positive: an organ that a threshold finds at Dice ~1 measures nothing a network learns.
    """
    img = image.astype(np.float32).ravel()
    mask = (label == organ).ravel()
    n_organ = int(mask.sum())
    if n_organ == 0:
        raise ValueError(f"organ {organ} is absent from the label map")
    edges = _hu_edges(img, bin_hu)
    if len(edges) < 2:
        return 1.0
    h_all = np.histogram(img, edges)[0].astype(np.float64)
    h_org = np.histogram(img[mask], edges)[0].astype(np.float64)
    return _best_interval_dice(h_all, h_org, n_organ)


def _hu_edges(img: np.ndarray, bin_hu: float) -> np.ndarray:
    """The HU grid of the interval search: from the image's minimum to its maximum in steps of ``bin_hu``."""
    lo, hi = float(img.min()), float(img.max())
    return np.arange(lo, hi + bin_hu, bin_hu)


def _best_interval_dice(h_all: np.ndarray, h_target: np.ndarray, n_target: int) -> float:
    """The best Dice of a run of histogram bins: ``h_all`` counts what the interval takes, ``h_target`` the hits."""
    c_all, c_org = np.concatenate([[0], np.cumsum(h_all)]), np.concatenate([[0], np.cumsum(h_target)])
    # interval of bins [a, b): TP = c_org[b] - c_org[a], predicted = c_all[b] - c_all[a]
    tp = c_org[None, :] - c_org[:, None]
    pred = c_all[None, :] - c_all[:, None]
    valid = np.triu(np.ones_like(tp, dtype=bool), 1)
    dsc = np.where(valid, 2.0 * tp / np.maximum(pred + n_target, 1.0), 0.0)
    return float(dsc.max())


def organ_report(image: sitk.Image, label: sitk.Image) -> dict[str, dict[str, float]]:
    """{organ name: {"cnr", "threshold_dice", "volume_ml"}} for every labeled organ present."""
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    spacing_zyx = image.GetSpacing()[::-1]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    out = {}
    for name, value in LABELS.items():
        if value == 0 or not (lab == value).any():
            continue
        out[name] = {
            "cnr": organ_cnr(img, lab, value, spacing_zyx),
            "threshold_dice": best_threshold_dice(img, lab, value),
            "volume_ml": float((lab == value).sum()) * voxel_ml,
        }
    return out


# --- is each lesion a fair test? (the organ measures, per lesion) -------------------------------------------

#: size bins (mm, equivalent-sphere diameter) of :func:`lesion_report`'s summaries: < 10, 10-20, >= 20
LESION_SIZE_BINS_MM = (10.0, 20.0)


def lesion_type(value: int, contrast_hu: float) -> str:
    """The reported type of a lesion: its label, and for a liver lesion whether it is darker than the liver."""
    if value == LESION_LABELS["liver_tumour"]:
        return "liver lesion, hyper" if contrast_hu > 0 else "liver lesion, hypo"
    return {LESION_LABELS["kidney_tumour"]: "kidney tumour", LESION_LABELS["kidney_cyst"]: "kidney cyst"}[
        value
    ]


def size_bin(diameter_mm: float) -> str:
    lo, hi = LESION_SIZE_BINS_MM
    return (
        f"< {lo:g} mm" if diameter_mm < lo else (f"{lo:g}-{hi:g} mm" if diameter_mm < hi else f">= {hi:g} mm")
    )


def lesion_report(
    image: sitk.Image, label: sitk.Image, shell_mm: float = 4.0, bin_hu: float = 5.0
) -> list[dict[str, float | str]]:
    """One row per lesion (a connected component of a :data:`LESION_LABELS` value) of a phantom.

    Row: ``type`` (:func:`lesion_type`), ``diameter_mm`` (of the sphere of its volume), ``volume_ml``,
    ``contrast_hu`` (signed: median inside it, >= 2 mm from its border, or >= 1 mm or all of it when that is
    under 8 voxels, minus the median of the host organ's parenchyma within ``shell_mm`` of it, or of the whole
    shell when the host has under 8 voxels there), ``cnr`` (|contrast| over the white-noise sigma of
    :func:`organ_cnr`, from the neighbour differences along all three axes inside the lesion and inside that
    shell: a small lesion has too few pairs of its own), ``threshold_dice`` (the best single HU interval over the
    whole image, as :func:`best_threshold_dice`; the other lesions count neither way) and
    ``organ_threshold_dice`` (the same interval search within the host organ and this lesion only: what a
    threshold finds once the organ is known).
    """
    img = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(label)
    spacing = [float(s) for s in image.GetSpacing()[::-1]]
    voxel_mm3 = float(np.prod(spacing))
    edges = _hu_edges(img, bin_hu)
    h_img = np.histogram(img, edges)[0].astype(np.float64)
    h_lesions = np.histogram(img[np.isin(lab, list(LESION_LABELS.values()))], edges)[0].astype(np.float64)
    margin = [int(np.ceil((shell_mm + 1.0) / s)) + 1 for s in spacing]
    rows: list[dict[str, float | str]] = []
    for value in LESION_LABELS.values():
        components, n = ndimage.label(lab == value, structure=np.ones((3, 3, 3)))
        if n == 0:
            continue
        host_all = lab == LESION_HOST[value]
        h_host = np.histogram(img[host_all], edges)[0].astype(np.float64)
        for k, box in enumerate(ndimage.find_objects(components), 1):
            crop = tuple(
                slice(max(0, b.start - m), min(dim, b.stop + m)) for b, m, dim in zip(box, margin, lab.shape)
            )
            im, lesion, host = img[crop], components[crop] == k, host_all[crop]
            n_voxels = int(lesion.sum())
            h_self = np.histogram(im[lesion], edges)[0].astype(np.float64)
            depth = ndimage.distance_transform_edt(lesion, sampling=spacing)
            inside = next((m for m in (depth >= 2.0, depth >= 1.0) if m.sum() >= 8), lesion)
            around = ndimage.distance_transform_edt(~lesion, sampling=spacing)
            shell = (around > 0) & (around <= shell_mm)
            if (shell & host).sum() >= 8:
                shell = shell & host
            contrast = float(np.median(im[inside])) - float(np.median(im[shell]))
            diffs = [_pair_differences(im, region, ax) for region in (inside, shell) for ax in range(3)]
            noise = _noise_sigma(np.concatenate(diffs))
            diameter = float((6.0 * n_voxels * voxel_mm3 / np.pi) ** (1.0 / 3.0))
            rows.append(
                {
                    "type": lesion_type(value, contrast),
                    "diameter_mm": diameter,
                    "volume_ml": n_voxels * voxel_mm3 / 1000.0,
                    "contrast_hu": contrast,
                    "cnr": abs(contrast) / max(noise, 1e-6),
                    "threshold_dice": _best_interval_dice(h_img - h_lesions + h_self, h_self, n_voxels),
                    "organ_threshold_dice": _best_interval_dice(h_host + h_self, h_self, n_voxels),
                }
            )
    return rows


# --- is the case class a fair test? (not decidable from one global lung number) ----------------------------

#: the global lung numbers a classifier could take a short cut through (docs/classification.md, "The phantoms")
LUNG_FEATURES = ("mean_hu", "p10_hu", "p50_hu", "p90_hu", "dense_fraction")
#: HU over which a lung voxel counts as dense in ``dense_fraction``
DENSE_HU = -500.0


def lung_features(image: sitk.Image, label: sitk.Image) -> dict[str, float]:
    """The global numbers of :data:`LUNG_FEATURES` over a chest phantom's lungs (every :data:`LUNG_LABELS`
    voxel: a perfect lung segmentation, the strongest form of the short cut), and ``affected_fraction``, the
    ground truth: the share of the lungs a disease is painted in (0 in normal lungs)."""
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    lung = np.isin(lab, list(LUNG_LABELS.values()))
    if lung.sum() < 8:
        raise ValueError(f"the label map has {int(lung.sum())} lung voxels; is it a chest phantom?")
    hu = img[lung].astype(np.float32)
    sick = np.isin(lab, [LUNG_LABELS["consolidation"], LUNG_LABELS["ground_glass"]])
    p10, p50, p90 = np.percentile(hu, [10, 50, 90])
    return {
        "mean_hu": float(hu.mean()),
        "p10_hu": float(p10),
        "p50_hu": float(p50),
        "p90_hu": float(p90),
        "dense_fraction": float((hu > DENSE_HU).mean()),
        "affected_fraction": float(sick.sum()) / float(lung.sum()),
    }


def classification_features(
    task: str,
    seed: int,
    count: int,
    *,
    shape_mm: tuple[float, float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[list[dict[str, float]], list[str]]:
    """:func:`lung_features` of the first ``count`` training cases of a classification task (the phantoms
    :func:`write_classification_dataset` writes with this seed, and their labels), and their classes."""
    t = CLASSIFICATION_TASKS[task]
    classes = case_classes(task, seed, 1, count)
    features = []
    for i, cls in enumerate(tqdm(classes, desc=f"{task} lung features", unit="case", leave=False)):
        image, label = make_phantom(
            _stream_seed(seed, 1, i), shape_mm, spacing, field=t.field, lung_disease=t.classes[cls]
        )
        features.append(lung_features(image, label))
    return features, classes


def single_feature_accuracy(
    features: list[dict[str, float]], classes: list[str], folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Cross-validated accuracy of a logistic regression (multinomial, standardised input) on each feature of
    :data:`LUNG_FEATURES` alone, and on all of them together (key ``"all"``); chance is one over the classes.

    Stratified ``folds``-fold cross-validation, shuffled with ``seed``: every case is predicted once by a model
    that did not see it; the accuracy is the share of cases predicted right.
    """
    # scikit-learn is needed by this measure only: imported here, so that generating phantoms does not load it
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(classes)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = {}
    for key, names in [*((k, [k]) for k in LUNG_FEATURES), ("all", list(LUNG_FEATURES))]:
        x = np.array([[f[n] for n in names] for f in features], dtype=np.float64)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        out[key] = float((cross_val_predict(model, x, y, cv=cv) == y).mean())
    return out
