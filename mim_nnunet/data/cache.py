"""The on-disk cache of preprocessed volumes: one blosc2 NDArray (``.b2nd``) + one JSON per case.

Layout of a cache folder::

    settings.json           PreprocessSettings + digest + format version of the cached cases
    index.json              case ids of the last preprocessing run (what the loader serves)
    fingerprint.json        corpus fingerprint (see preprocess.py)
    skipped.txt / .json     skip report of the last run
    cases/<id>.b2nd         quantised volume, axes (z, y, x) as nnU-Net; value/levels = window-mapped [0, 1]
    cases/<id>.json         per-case metadata (written last: its presence marks the case as done)
    cases/<id>.hu.npy       a small sample of body HU values (for the fingerprint's intensity percentiles)

Volumes are stored as unsigned integers: ``q = round(x * levels)`` with x in [0, 1]. With the default window
[-1000, 1000] and uint16 that is 1 HU per step, and blosc2 (bitshuffle + zstd) stores it in less space than the
int16 input. Chunks of 64^3 and blocks of 16^3 let a random crop decompress only the blocks it touches.
This module knows files and arrays only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import blosc2
import numpy as np

CHUNKS = 64
BLOCKS = 16
DTYPE_LEVELS = {
    "uint8": 255,
    "uint16": 2000,
}  # quantisation levels per dtype (uint16: 1 HU at a 2000-HU window)


def case_paths(cache_dir: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    d = Path(cache_dir) / "cases"
    return d / f"{case_id}.b2nd", d / f"{case_id}.json", d / f"{case_id}.hu.npy"


def quantise(x01: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] floats -> the stored integers (``dtype`` in :data:`DTYPE_LEVELS`)."""
    levels = DTYPE_LEVELS[dtype]
    return np.rint(np.clip(x01, 0.0, 1.0) * levels).astype(dtype)


def write_volume(path: Path, q: np.ndarray) -> None:
    """Write atomically (temp + rename): a killed run never leaves a half-written volume under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = tuple(min(CHUNKS, s) for s in q.shape)
    blocks = tuple(min(BLOCKS, c) for c in chunks)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".b2nd.tmp")
    os.close(fd)
    os.remove(tmp)  # blosc2 refuses to overwrite in some versions; it creates the file itself
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}
    try:
        blosc2.asarray(
            np.ascontiguousarray(q), urlpath=tmp, mode="w", chunks=chunks, blocks=blocks, cparams=cparams
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def open_volume(path: str | Path):
    """The NDArray, lazily: slicing decompresses only the blocks a region touches."""
    return blosc2.open(str(path), mode="r", dparams={"nthreads": 1})


def read_volume(path: str | Path) -> np.ndarray:
    return open_volume(path)[...]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
