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
This module knows files and arrays only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blosc2
import numpy as np

log = logging.getLogger(__name__)

CHUNKS = 64
USERS = "users"
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


def _umask_mode(mode: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    os.fchmod(fd, _umask_mode())  # mkstemp's 0600 would survive the rename: other users could not read the cache
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


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
