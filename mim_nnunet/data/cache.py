"""The on-disk cache of preprocessed volumes: one blosc2 NDArray (``.b2nd``) + one JSON per case.

Layout of a cache folder::

    settings.json           PreprocessSettings + digest + format version of the cached cases
    index.json              case ids of the last preprocessing run (what the loader serves)
    fingerprint.json        corpus fingerprint (see preprocess.py)
    skipped.txt / .json     skip report of the last run
    cases/<id>.b2nd         quantised volume, axes (z, y, x) as nnU-Net; value/levels = window-mapped [0, 1]
    cases/<id>.json         per-case metadata (written last: its presence marks the case as done)
    cases/<id>.hu.npy       a small sample of body HU values (for the fingerprint's intensity percentiles)
    users/<host>.<pid>.json  one per process using the cache (preprocessing or training): its pid, host, process
                            start time, settings digest and purpose. A cache is emptied for other settings only
                            when no other live process is registered (:func:`cache_user`, :func:`other_users`).

Volumes are stored as unsigned integers: ``q = round(x * levels)`` with x in [0, 1]. With the default window
[-1000, 1000] and uint16 that is 1 HU per step, and blosc2 (bitshuffle + zstd) stores it in less space than the
int16 input. Chunks of 64^3 and blocks of 16^3 let a random crop decompress only the blocks it touches.
This module owns the layout: every file name of a cache is a constant or a function here, and nothing else
names them (tests/test_architecture.py checks). It also answers what a run trained on (:func:`cache_identity`,
:func:`check_cache_identity`). It knows files and arrays only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import blosc2
import numpy as np

from ..atomic import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from .preprocess import PreprocessSettings

log = logging.getLogger(__name__)

CHUNKS = 64
SETTINGS = "settings.json"
INDEX = "index.json"
FINGERPRINT = "fingerprint.json"
SKIPPED_TXT = "skipped.txt"
SKIPPED_JSON = "skipped.json"
CASES = "cases"
USERS = "users"
# the files of one case (:func:`case_paths`); ``.tmp``: a write cut short (mim_nnunet.atomic)
CASE_SUFFIXES = (".b2nd", ".json", ".hu.npy", ".tmp")
BLOCKS = 16
DTYPE_LEVELS = {
    "uint8": 255,
    "uint16": 2000,
}  # quantisation levels per dtype (uint16: 1 HU at a 2000-HU window)


def case_paths(cache_dir: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    d = Path(cache_dir) / CASES
    return (
        d / f"{case_id}{CASE_SUFFIXES[0]}",
        d / f"{case_id}{CASE_SUFFIXES[1]}",
        d / f"{case_id}{CASE_SUFFIXES[2]}",
    )


def case_files(cache_dir: str | Path) -> list[Path]:
    """Every file of the cached cases (volumes, metadata, HU samples, temporaries), for emptying the cache."""
    d = Path(cache_dir) / CASES
    return [p for p in d.glob("*") if p.name.endswith(CASE_SUFFIXES)] if d.is_dir() else []


def quantise(x01: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] floats -> the stored integers (``dtype`` in :data:`DTYPE_LEVELS`)."""
    levels = DTYPE_LEVELS[dtype]
    return np.rint(np.clip(x01, 0.0, 1.0) * levels).astype(dtype)


def write_volume(path: Path, q: np.ndarray) -> None:
    """Write atomically (:mod:`mim_nnunet.atomic`): a killed run never leaves a half-written volume under the final
    name."""
    chunks = tuple(min(CHUNKS, s) for s in q.shape)
    blocks = tuple(min(BLOCKS, c) for c in chunks)
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}

    def write(tmp: str) -> None:
        os.remove(tmp)  # blosc2 refuses to overwrite in some versions; it creates the file itself
        blosc2.asarray(
            np.ascontiguousarray(q), urlpath=tmp, mode="w", chunks=chunks, blocks=blocks, cparams=cparams
        )

    atomic_write(path, write)


def open_volume(path: str | Path):
    """The NDArray, lazily: slicing decompresses only the blocks a region touches."""
    return blosc2.open(str(path), mode="r", dparams={"nthreads": 1})


def read_volume(path: str | Path) -> np.ndarray:
    return open_volume(path)[...]


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------ what a run trained on


def load_fingerprint(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / FINGERPRINT
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run preprocessing (mim_nnunet.data.preprocess_corpus) into {cache_dir} first"
        )
    return read_json(path)


def cache_identity(cache_dir: str | Path) -> dict:
    """What a run trained on: the settings digest of the cache and its case ids (count and sha256 of the sorted
    list). A resumed run must find the same (:func:`check_cache_identity`)."""
    cache_dir = Path(cache_dir)
    try:
        settings = read_json(cache_dir / SETTINGS)
        index = read_json(cache_dir / INDEX)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{cache_dir}: not a complete preprocessed cache ({e})") from None
    cases = sorted(index.get("cases", []))
    return {
        "settings_digest": settings.get("digest"),
        "index_digest": index.get("settings_digest"),
        "spacing": settings.get("spacing"),
        "window": settings.get("window"),
        "num_cases": len(cases),
        "cases_sha256": hashlib.sha256("\n".join(cases).encode()).hexdigest(),
    }


def check_cache_identity(cache_dir: str | Path, expected: dict, settings: PreprocessSettings) -> None:
    """Raise ``RuntimeError`` (one line, naming both sides) unless ``cache_dir`` holds the data of ``expected``
    (a :func:`cache_identity` recorded earlier; may be empty for runs that recorded none) preprocessed with
    ``settings``."""
    now = cache_identity(cache_dir)
    want = {"settings_digest": settings.digest(), "index_digest": settings.digest()}
    want |= {k: expected[k] for k in ("settings_digest", "num_cases", "cases_sha256") if k in expected}
    diff = [k for k, v in want.items() if now.get(k) != v]
    if diff:
        raise RuntimeError(
            f"cache {cache_dir} no longer holds this run's data: {', '.join(diff)} differ (run: spacing "
            f"{list(settings.spacing)}, window {list(settings.window)}, digest {want['settings_digest']}, "
            f"{expected.get('num_cases', '?')} cases; cache now: spacing {now['spacing']}, window {now['window']}, "
            f"digest {now['settings_digest']}, {now['num_cases']} cases); another run rewrote it: restore it "
            "with this run's inputs and settings (--preprocess-only into the same --cache), or start a new run"
        )


def cached_cases(cache_dir: str | Path) -> list[dict]:
    """Metadata of the cases of the last run (``index.json``), checked against the cache's settings."""
    cache_dir = Path(cache_dir)
    index_path = cache_dir / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: {cache_dir} is not a preprocessed cache")
    index = read_json(index_path)
    digest = read_json(cache_dir / SETTINGS).get("digest")
    if index.get("settings_digest") != digest:
        raise RuntimeError(f"{cache_dir}: {INDEX} was written with other settings; preprocess again")
    return [read_json(case_paths(cache_dir, c)[1]) for c in index["cases"]]


# ------------------------------------------------------------------------------------------ who uses a cache


class CacheInUseError(RuntimeError):
    """The cache would have to be emptied, but another live process uses it; the message names the holder."""


def _host() -> str:
    return socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live process from a reused pid); None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Only processes of this host can be checked; one of another host counts as alive."""
    if holder.get("host") != _host():
        return True
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    start = _start_time(pid)
    return start is None or holder.get("start") in (None, start)


def _user_file(cache_dir: str | Path, pid: int | None = None) -> Path:
    return Path(cache_dir) / USERS / f"{_host()}.{os.getpid() if pid is None else pid}.json"


def describe_user(holder: dict, path: Path | None = None) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    text = f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('purpose')}, since {since})"
    return text + (f", registered in {path}" if path else "")


def other_users(cache_dir: str | Path) -> list[tuple[Path, dict]]:
    """Live processes other than this one registered in ``cache_dir``; stale entries of this host (the process
    is gone: killed with SIGKILL, node rebooted) are removed on the way."""
    folder = Path(cache_dir) / USERS
    mine = _user_file(cache_dir)
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        if path == mine:
            continue
        try:
            holder = read_json(path)
        except (OSError, ValueError):
            continue  # vanished or being replaced: its owner is alive and rewrites it atomically
        if _alive(holder):
            found.append((path, holder))
        else:
            log.info("cache %s: removing the stale registration of %s", cache_dir, describe_user(holder))
            path.unlink(missing_ok=True)
    return found


@contextmanager
def cache_user(cache_dir: str | Path, digest: str, purpose: str) -> Iterator[Path]:
    """Register this process as a user of ``cache_dir`` while the block runs. Re-entrant: an inner use of the
    same process keeps the outer registration (and its purpose)."""
    path = _user_file(cache_dir)
    own = not path.is_file()
    if own:
        write_json(path, {"pid": os.getpid(), "host": _host(), "start": _start_time(os.getpid()),
                          "digest": digest, "purpose": purpose, "since": time.time()})  # fmt: skip
        other_users(cache_dir)  # on the way, removes registrations of processes gone without cleaning up
    try:
        yield path
    finally:
        if own:
            path.unlink(missing_ok=True)
