"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

A kill at any moment leaves either the old file or the new one under the final name, never a half-written one
(product.md, "Writes are atomic"). The temporary is ``.<name>.<random>.tmp`` in the target's folder (the same file
system, so the rename is atomic); a write cut short by SIGKILL leaves only such a temporary, which its owner
removes later (the run folder's :func:`mim_nnunet.pretrain.folder.remove_temporaries`, the cache's invalidation).
The file gets the mode a plain ``open()`` would (the umask), not mkstemp's 0600, so teammates and containers
running under another user can read checkpoints and caches.

Used by the checkpoint format and the preprocessed cache alike; this module depends on the standard library only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = True) -> None:
    """``write(tmp)`` fills a temporary path (which exists, empty; a writer that must create the file itself may
    remove it first); then the temporary replaces ``path``. On any error the temporary is removed and the error
    raised; ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), fsync)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent), fsync)
