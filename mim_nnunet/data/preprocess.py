"""Preprocessing of the pre-training corpus into the blosc2 cache (product.md, "Data flow").

Per case: read with SimpleITK exactly as nnU-Net's ``SimpleITKIO`` does (``GetArrayFromImage``: axes (z, y, x),
spacing reversed, *no* reorientation, so pre-training sees volumes the way nnU-Net fine-tuning will), check it
(bad input is skipped with a one-line reason, never fatal, never silent), crop to the body, resample to the
target spacing with nnU-Net's own data resampling (order 3, separate z for anisotropic spacing), map the HU
window to [0, 1], quantise and store (:mod:`.cache`, which owns the file names). The corpus gets a fingerprint.

Re-running skips finished cases; a changed :class:`PreprocessSettings` digest (spacing, window, storage, code
format version) invalidates the cache, unless another live process uses it (:func:`.cache.cache_user`): then
:class:`.cache.CacheInUseError` names the holder and nothing is deleted. Only :func:`preprocess_corpus` raises:
when no valid case is left, or when the cache is in use.
This module knows files and arrays but no network.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from nnunetv2.preprocessing.resampling.default_resampling import (
    compute_new_shape,
    resample_data_or_seg_to_shape,
)
from scipy import ndimage
from tqdm import tqdm

from ..interrupt import children_ignore_sigint as _children_ignore_sigint
from .cache import (
    DTYPE_LEVELS,
    FINGERPRINT,
    INDEX,
    SETTINGS,
    SKIPPED_JSON,
    SKIPPED_TXT,
    CacheInUseError,
    cache_identity,  # noqa: F401 -- this and the three below: re-exported, callers imported them from here
    cache_user,
    cached_cases,  # noqa: F401
    case_files,
    case_paths,
    check_cache_identity,  # noqa: F401
    describe_user,
    load_fingerprint,  # noqa: F401
    other_users,
    quantise,
    read_json,
    write_json,
    write_volume,
)
from .sources import CaseSource, resolve_inputs

log = logging.getLogger(__name__)

#: bump when the stored data or metadata change meaning: invalidates every existing cache
CACHE_FORMAT_VERSION = 1


class CorpusError(RuntimeError):
    """No valid case left: the message names the inputs, the number skipped and the skip report."""


class SkipCase(Exception):
    """A case that cannot be used; ``str(e)`` is the one-line reason that goes into the skip report."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the cached data. Fields with ``metadata={"digest": False}`` only decide which cases
    are accepted (those are re-checked on every run) and do not invalidate the cache."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # mm, (z, y, x) as nnU-Net
    window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to [0, 1] (mim_method.md §5)
    dtype: str = "uint16"  # stored integers: "uint16" (1 HU steps at the default window) or "uint8"
    order: int = 3  # nnU-Net's default data resampling: spline order in-plane ...
    order_z: int = 0  # ... and along a strongly anisotropic axis (separate z, as nnU-Net)
    body_threshold: float = -500.0  # HU; the body is the large connected regions above it
    crop_margin_mm: float = 5.0
    # acceptance checks
    max_axis_voxels: int = field(default=2048, metadata={"digest": False})
    max_voxels: float = field(default=1e9, metadata={"digest": False})
    min_extent_mm: float = field(
        default=48.0, metadata={"digest": False}
    )  # smaller volumes are mostly padding
    ct_max_below: float = field(default=-500.0, metadata={"digest": False})  # max below this: no tissue
    ct_min_above: float = field(default=-200.0, metadata={"digest": False})  # min above this: no air, not HU
    # False: accept volumes without air (ROI crops cut inside the body, as many derived datasets ship); the other
    # checks still hold (mim_nnunet_pretrain --allow-no-air)
    require_air: bool = field(default=True, metadata={"digest": False})
    ct_abs_limit: float = field(default=1e5, metadata={"digest": False})  # |HU| beyond this: not HU

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "window", tuple(float(w) for w in self.window))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {self.spacing}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (lo, hi) HU with lo < hi, got {self.window}")
        if self.dtype not in DTYPE_LEVELS:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_LEVELS)}, got {self.dtype!r}")

    @property
    def levels(self) -> int:
        return DTYPE_LEVELS[self.dtype]

    def digest(self) -> str:
        """Hash of every field that changes the cached data, plus the cache format version."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("digest", True)}
        d["format_version"] = CACHE_FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = {**asdict(self), "digest": self.digest(), "format_version": CACHE_FORMAT_VERSION}
        return json.loads(json.dumps(d))  # tuples -> lists: equal to what settings.json reads back


@dataclass
class CorpusReport:
    cases: list[str]  # case ids now in the cache (processed this run or reused)
    skipped: list[tuple[str, str]]  # (source, one-line reason)
    fingerprint: dict
    cache_dir: Path
    reused: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.cases)} cases in {self.cache_dir} ({len(self.cases) - self.reused} preprocessed, "
            f"{self.reused} reused), {len(self.skipped)} skipped"
        )


# --------------------------------------------------------------------------------------------------- reading


def _source_stamp(src: CaseSource) -> dict:
    """Size and mtime of the input: a case whose input changed is preprocessed again."""
    files = src.files or (src.path,)
    stats = [os.stat(f) for f in files]
    return {"bytes": int(sum(s.st_size for s in stats)), "mtime": max(s.st_mtime for s in stats)}


def _raw_bytes(src: CaseSource) -> int:
    """Bytes on disk of the input, including the pixel file next to a .mhd/.nhdr header."""
    if src.files:
        return sum(os.path.getsize(f) for f in src.files)
    p = Path(src.path)
    total = p.stat().st_size
    if p.suffix.lower() in (".mhd", ".nhdr"):
        total += sum(c.stat().st_size for c in p.parent.glob(p.stem + ".*") if c != p and c.suffix != ".json")
    return total


def _check_geometry(size, spacing, dim: int, components: int, s: PreprocessSettings) -> None:
    """Header checks, before any pixel is read."""
    if components != 1:
        raise SkipCase(f"multi-component image ({components} components per voxel), expected one CT channel")
    if dim == 2:
        raise SkipCase(f"2D image (size {tuple(size)}), expected a 3D volume")
    if dim == 4 and size[3] != 1:
        raise SkipCase(f"4D image (size {tuple(size)}), expected a 3D volume")
    if dim not in (3, 4):
        raise SkipCase(f"{dim}D image, expected a 3D volume")
    size, spacing = list(size)[:3], list(spacing)[:3]
    if min(size) < 2:
        raise SkipCase(f"2D image stored as 3D (size {tuple(size)})")
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise SkipCase(f"zero, negative or non-finite spacing {tuple(spacing)}")
    if max(size) > s.max_axis_voxels or math.prod(size) > s.max_voxels:
        raise SkipCase(
            f"absurd size {tuple(size)} (limits: {s.max_axis_voxels} voxels per axis, {s.max_voxels:.0e} in total)"
        )
    extent = [n * sp for n, sp in zip(size, spacing, strict=True)]
    if min(extent) < s.min_extent_mm:
        raise SkipCase(
            f"physical extent {tuple(round(e, 1) for e in extent)} mm below min_extent_mm={s.min_extent_mm}"
        )


def _nifti_bytes(path: str) -> tuple[int, int]:
    """(bytes the NIfTI header promises, bytes present). ITK's NIfTI reader silently zero-fills a truncated file,
    so NIfTI files are checked here; the other formats' readers raise on truncation themselves."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        present = len(head)
        while chunk := f.read(1 << 22):  # a truncated gzip stream raises EOFError here
            present += len(chunk)
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if size == 540:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        raise SkipCase(f"unreadable: not a NIfTI header (sizeof_hdr {struct.unpack('<i', head[:4])[0]})")
    nvox = math.prod(max(1, d) for d in dims[1 : 1 + max(0, min(7, dims[0]))])
    return max(offset, 348) + nvox * bitpix // 8, present


def _itk_reason(e: RuntimeError) -> str:
    """The informative line of an ITK exception (its last one), without object addresses."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    last = re.sub(
        r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", lines[-1] if lines else str(e)
    )
    return last[:200]


def read_case(src: CaseSource, s: PreprocessSettings) -> tuple[np.ndarray, dict]:
    """The volume as nnU-Net's SimpleITKIO gives it (float32, axes z, y, x) and its geometry; raises SkipCase."""
    try:
        if src.series_uid is None:
            reader = sitk.ImageFileReader()
            reader.SetFileName(src.path)
            reader.ReadImageInformation()
            _check_geometry(
                reader.GetSize(), reader.GetSpacing(), reader.GetDimension(),
                reader.GetNumberOfComponents(), s,
            )  # fmt: skip
            if src.path.lower().endswith((".nii", ".nii.gz")):
                try:
                    expected, present = _nifti_bytes(src.path)
                except (EOFError, OSError, zlib.error) as e:
                    raise SkipCase(
                        f"unreadable: truncated or corrupt file ({type(e).__name__}: {e})"
                    ) from None
                if present < expected:
                    raise SkipCase(f"unreadable: truncated file ({present} of {expected} bytes)")
            image = reader.Execute()
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(src.files))
            image = reader.Execute()
    except RuntimeError as e:  # ITK raises RuntimeError for unreadable / truncated / unsupported files
        raise SkipCase(f"unreadable: {_itk_reason(e)}") from None
    _check_geometry(
        image.GetSize(), image.GetSpacing(), image.GetDimension(), image.GetNumberOfComponentsPerPixel(), s
    )
    if image.GetDimension() == 4:  # (x, y, z, 1): a 3D volume in a 4D header
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    props = {
        "spacing": [float(v) for v in image.GetSpacing()[::-1]],  # (z, y, x), as nnU-Net
        "shape": list(arr.shape),
        "sitk_spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }
    return arr, props


def _check_intensities(arr: np.ndarray, s: PreprocessSettings) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        raise SkipCase(f"{int((~finite).sum())} NaN/Inf voxels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise SkipCase(f"constant volume (every voxel {lo:g})")
    if hi < s.ct_max_below:
        raise SkipCase(f"not CT: max {hi:g} < {s.ct_max_below:g} HU (no tissue)")
    if s.require_air and lo > s.ct_min_above:
        raise SkipCase(
            f"not CT: min {lo:g} > {s.ct_min_above:g} HU (no air; MR, [0,1] or [0,255] intensities? CT crops cut "
            "inside the body: --allow-no-air)"
        )
    if max(abs(lo), abs(hi)) > s.ct_abs_limit:
        raise SkipCase(f"not CT: intensities up to {max(abs(lo), abs(hi)):g}, beyond +-{s.ct_abs_limit:g} HU")


# ------------------------------------------------------------------------------------------- crop and resample


def body_mask(arr: np.ndarray, s: PreprocessSettings) -> tuple[np.ndarray, list[int]]:
    """The body on a coarse grid (every ``strides``-th voxel, <= 96 per axis): voxels above ``body_threshold`` in
    connected regions of at least 10 % of the largest one (drops the table and noise), holes (lungs) filled."""
    strides = [max(1, math.ceil(n / 96)) for n in arr.shape]
    coarse = arr[:: strides[0], :: strides[1], :: strides[2]] > s.body_threshold
    labels, n = ndimage.label(coarse)
    if n == 0:
        raise SkipCase(f"no voxel above body_threshold={s.body_threshold:g} HU")
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    return ndimage.binary_fill_holes(keep), strides


def body_bbox(mask: np.ndarray, strides, shape, spacing, margin_mm: float) -> list[list[int]]:
    """Bounding box [[lo, hi), ...] in full-resolution voxels of a coarse ``mask``, plus ``margin_mm``."""
    out = []
    for (lo, hi), st, n_ax, sp in zip(get_bbox_from_mask(mask), strides, shape, spacing, strict=True):
        margin = st + math.ceil(margin_mm / sp)
        out.append([max(0, lo * st - margin), min(n_ax, hi * st + margin)])
    return out


def _intensity_stats(body_hu: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    sample = body_hu if body_hu.size <= 20000 else rng.choice(body_hu, 20000, replace=False)
    p = np.percentile(sample, [0.5, 5, 50, 95, 99.5])
    stats = {
        "min": float(body_hu.min()), "max": float(body_hu.max()),
        "mean": float(sample.mean()), "std": float(sample.std()),
        "percentile_00_5": float(p[0]), "percentile_05": float(p[1]), "median": float(p[2]),
        "percentile_95": float(p[3]), "percentile_99_5": float(p[4]),
    }  # fmt: skip
    small = sample if sample.size <= 2000 else rng.choice(sample, 2000, replace=False)
    return stats, np.clip(np.rint(small), -32768, 32767).astype(np.int16)


def window_and_resample(arr: np.ndarray, spacing, s: PreprocessSettings) -> np.ndarray:
    """HU (z, y, x) at ``spacing`` -> the window mapped to [0, 1] at ``s.spacing`` (clips ``arr`` in place)."""
    lo, hi = s.window
    np.clip(arr, lo, hi, out=arr)  # before the spline: no ringing from the -1000/+3000 HU edges
    new_shape = [max(1, int(v)) for v in compute_new_shape(arr.shape, spacing, s.spacing)]
    res = resample_data_or_seg_to_shape(
        arr[None], new_shape, spacing, s.spacing, is_seg=False, order=s.order, order_z=s.order_z,
        force_separate_z=None,
    )[0]  # fmt: skip
    return (res - lo) / (hi - lo)


def preprocess_case(src: CaseSource, cache_dir: str | Path, s: PreprocessSettings) -> dict:
    """Read, check, crop, resample, window, store one case; returns its metadata. Raises SkipCase."""
    arr, props = read_case(src, s)
    _check_intensities(arr, s)
    mask, strides = body_mask(arr, s)
    rng = np.random.default_rng(int(hashlib.sha1(src.case_id.encode()).hexdigest()[:8], 16))
    stats, hu_sample = _intensity_stats(arr[:: strides[0], :: strides[1], :: strides[2]][mask], rng)
    bbox = body_bbox(mask, strides, arr.shape, props["spacing"], s.crop_margin_mm)
    arr = arr[tuple(slice(lo, hi) for lo, hi in bbox)]
    q = quantise(window_and_resample(arr, props["spacing"], s), s.dtype)
    vol_path, meta_path, hu_path = case_paths(cache_dir, src.case_id)
    write_volume(vol_path, q)
    np.save(hu_path, hu_sample)
    meta = {
        "case_id": src.case_id,
        "source": src.path,
        "series_uid": src.series_uid,
        "source_stamp": _source_stamp(src),
        "raw_bytes": _raw_bytes(src),
        "cache_bytes": vol_path.stat().st_size,
        "original": props,  # spacing/shape (z, y, x), sitk_spacing/origin/direction as SimpleITK
        "bbox": bbox,  # [[lo, hi), ...] in original voxels (z, y, x), before resampling
        "cropped_shape": list(arr.shape),
        "shape": list(q.shape),
        "spacing": list(s.spacing),
        "window": list(s.window),
        "dtype": s.dtype,
        "levels": s.levels,  # stored value / levels = window-mapped intensity in [0, 1]
        "intensity": stats,  # HU inside the body, before windowing
        "settings_digest": s.digest(),
    }
    write_json(meta_path, meta)  # last: its presence marks the case as done
    return meta


def _worker(src: CaseSource, cache_dir: str, s: PreprocessSettings) -> tuple[str, dict | str]:
    """Never raises for bad data: a skip reason or an unexpected error becomes a one-line reason."""
    try:
        return "ok", preprocess_case(src, cache_dir, s)
    except SkipCase as e:
        return "skip", str(e)
    except MemoryError:
        return "skip", "out of memory while preprocessing"
    except Exception as e:  # noqa: BLE001 -- any failure of one case must not end the run; it is reported
        return "skip", f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _worker_init() -> None:
    import torch  # noqa: F401 -- nnU-Net's resampling imports torch; keep each worker on one thread

    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- the corpus


def _is_done(src: CaseSource, cache_dir: Path, digest: str) -> dict | None:
    vol, meta_path, hu = case_paths(cache_dir, src.case_id)
    if not (meta_path.is_file() and vol.is_file() and hu.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("settings_digest") != digest or meta.get("source_stamp") != _source_stamp(src):
            return None
    except (OSError, ValueError):
        return None
    return meta


def _invalidate(cache_dir: Path, settings: PreprocessSettings) -> None:
    """A cache written with other settings is emptied (its case files only) before anything is written."""
    sfile = cache_dir / SETTINGS
    if sfile.is_file():
        old = read_json(sfile)
        if old.get("digest") != settings.digest():
            if users := other_users(cache_dir):
                path, holder = users[0]
                raise CacheInUseError(
                    f"cache {cache_dir} holds data for other settings (digest {old.get('digest')}: spacing "
                    f"{old.get('spacing')}, window {old.get('window')}; asked for {settings.digest()}: spacing "
                    f"{list(settings.spacing)}, window {list(settings.window)}) and is in use by "
                    f"{describe_user(holder, path)}; refusing to empty it: give another --cache, or wait for that "
                    "process to end"
                )
            n = 0
            for p in case_files(cache_dir):
                p.unlink()
                n += 1
            log.warning(
                "cache %s was written with other settings (digest %s, now %s): removed %d files",
                cache_dir, old.get("digest"), settings.digest(), n,
            )  # fmt: skip
    write_json(sfile, settings.to_dict())


def _ping() -> bool:
    return True


def _check_workers_start(ctx) -> None:
    """Tell a broken environment (workers that cannot even start) from a case that kills its worker."""
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init) as ex:
            with _children_ignore_sigint():
                fut = ex.submit(_ping)
            fut.result()
    except BrokenProcessPool:
        raise RuntimeError(
            "preprocessing worker processes cannot start (spawned processes must be able to import the main "
            "module: run from a script with an `if __name__ == '__main__':` guard, or use num_workers=0)"
        ) from None


def _run_pool(todo, cache_dir, settings, num_workers, progress) -> dict[str, tuple[str, dict | str]]:
    results: dict[str, tuple[str, dict | str]] = {}
    bar = tqdm(total=len(todo), desc="preprocessing", unit="case", disable=not progress)
    if num_workers <= 0:
        for src in todo:
            results[src.case_id] = _worker(src, str(cache_dir), settings)
            bar.update()
        bar.close()
        return results
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch/OpenMP threads
    crashed: list[CaseSource] = []
    with ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=ctx, initializer=_worker_init) as ex:
        with _children_ignore_sigint():  # the workers are spawned by submit()
            futs = {ex.submit(_worker, src, str(cache_dir), settings): src for src in todo}
        try:
            for f in as_completed(futs):
                src = futs[f]
                try:
                    results[src.case_id] = f.result()
                except BrokenProcessPool:
                    crashed.append(src)
                bar.update()
        except BaseException:  # interrupted: finish the cases in flight only
            ex.shutdown(wait=False, cancel_futures=True)
            raise
    # a worker died (segfault in a reader, OOM kill): retry those cases alone to find the culprit
    for src in crashed:
        try:
            with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init) as ex:
                with _children_ignore_sigint():
                    fut = ex.submit(_worker, src, str(cache_dir), settings)
                results[src.case_id] = fut.result()
        except BrokenProcessPool:
            _check_workers_start(ctx)
            results[src.case_id] = (
                "skip",
                "the worker process died while reading it (crash or out of memory)",
            )
    bar.close()
    return results


def _dist(values: list[list[float]]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": a.min(0).tolist(), "median": np.median(a, 0).tolist(), "max": a.max(0).tolist(),
        "mean": a.mean(0).tolist(), "p10": np.percentile(a, 10, 0).tolist(), "p90": np.percentile(a, 90, 0).tolist(),
    }  # fmt: skip


def compute_fingerprint(
    metas: list[dict], cache_dir: Path, settings: PreprocessSettings, n_skipped: int
) -> dict:
    """Counts, spacing/shape distributions before and after, HU percentiles inside the body, storage sizes."""
    hu = np.concatenate([np.load(case_paths(cache_dir, m["case_id"])[2]) for m in metas]).astype(np.float64)
    pct = [0.5, 1, 5, 25, 50, 75, 95, 99, 99.5]
    raw, cache = sum(m["raw_bytes"] for m in metas), sum(m["cache_bytes"] for m in metas)
    return {
        "num_cases": len(metas),
        "num_skipped": n_skipped,
        "settings": settings.to_dict(),
        "axis_order": "z, y, x (numpy array of SimpleITK.GetArrayFromImage, as nnU-Net; not reoriented)",
        "spacing_before": _dist([m["original"]["spacing"] for m in metas]),
        "shape_before": _dist([m["original"]["shape"] for m in metas]),
        "shape_after": _dist([m["shape"] for m in metas]),
        "spacing_after": list(settings.spacing),
        "voxels_after": int(sum(math.prod(m["shape"]) for m in metas)),
        "intensity": {
            "percentiles": {str(p): float(v) for p, v in zip(pct, np.percentile(hu, pct), strict=True)},
            "mean": float(hu.mean()),
            "std": float(hu.std()),
            "fraction_below_window": float((hu < settings.window[0]).mean()),
            "fraction_above_window": float((hu > settings.window[1]).mean()),
            "note": "HU inside the body (holes filled) before windowing, up to 2000 voxels sampled per case",
        },  # fmt: skip
        "bytes": {"raw": raw, "cache": cache, "cache_over_raw": cache / raw if raw else None},
    }


def preprocess_corpus(
    inputs: list[str] | str,
    cache_dir: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),  # noqa: B008 -- frozen, hence safe as a default
    num_workers: int = 2,
    progress: bool = True,
) -> CorpusReport:
    """Preprocess every case of ``inputs`` (see :mod:`.sources`) into ``cache_dir``; see the module docstring."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with cache_user(cache_dir, settings.digest(), "preprocessing"):
        return _preprocess_corpus(inputs, cache_dir, settings, num_workers, progress)


def _preprocess_corpus(
    inputs: list[str] | str, cache_dir: Path, settings: PreprocessSettings, num_workers: int, progress: bool
) -> CorpusReport:
    sources, problems = resolve_inputs(inputs)
    skipped: list[tuple[str, str]] = list(problems)
    _invalidate(cache_dir, settings)
    digest = settings.digest()

    metas: dict[str, dict] = {}
    todo = []
    for src in sources:
        meta = _is_done(src, cache_dir, digest)
        if meta is not None:
            metas[src.case_id] = meta
        else:
            todo.append(src)
    reused = len(metas)
    if reused:
        log.info("%d of %d cases already in the cache %s", reused, len(sources), cache_dir)
    results = _run_pool(todo, cache_dir, settings, num_workers, progress) if todo else {}
    for src in todo:
        status, payload = results[src.case_id]
        if status == "ok":
            metas[src.case_id] = payload
        else:
            skipped.append((src.describe(), payload))
            for p in case_paths(cache_dir, src.case_id):
                p.unlink(missing_ok=True)

    (cache_dir / SKIPPED_TXT).write_text("".join(f"{src}\t{reason}\n" for src, reason in skipped))
    write_json(cache_dir / SKIPPED_JSON, [{"source": s_, "reason": r} for s_, r in skipped])
    for src, reason in skipped:
        log.warning("skipped %s: %s", src, reason)
    cases = sorted(metas)
    if not cases:
        raise CorpusError(
            f"no valid case left in {list(inputs) if not isinstance(inputs, str) else [inputs]}: "
            f"{len(skipped)} skipped, see {cache_dir / SKIPPED_TXT}"
        )
    ordered = [metas[c] for c in cases]
    fingerprint = compute_fingerprint(ordered, cache_dir, settings, len(skipped))
    write_json(cache_dir / FINGERPRINT, fingerprint)
    write_json(cache_dir / INDEX, {"settings_digest": digest, "cases": cases})
    report = CorpusReport(cases, skipped, fingerprint, cache_dir, reused)
    log.info("%s", report.summary())
    return report
