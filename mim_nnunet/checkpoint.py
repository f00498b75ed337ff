"""The MiM checkpoint format: the contract between pre-training and fine-tuning (product.md).

One ``.safetensors`` file holds the weights (no pickle: loading a shared checkpoint cannot run code) and, in the
safetensors header, the JSON metadata of :class:`CheckpointMetadata` under the key ``"mim_nnunet"``. The sha256
of the weights (tensor names, dtypes, shapes and bytes, in sorted name order) is part of the metadata, and the
sha256 of the metadata itself (every other field, weights digest included: spacing, window, architecture, ...)
is stored next to it (format 2); both are verified on load. Format 1 files (written before the metadata digest)
stay readable: their weights are verified, their metadata cannot be. Writes are atomic (temporary file +
``os.replace``) and the files get the usual permissions of the umask (not mkstemp's 0600), so teammates and
containers running under another user can read them. The resume state (optimizer, scheduler, RNG, data
position) is a separate file, so losing it never loses weights.

This module depends on nothing of the project but itself and the atomic write (:mod:`mim_nnunet.atomic`, standard
library only, shared with the preprocessed cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_write

FORMAT_VERSION = 2  # 2: metadata_sha256 covers the metadata (1: the weights only)
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "mim_nnunet"
AXIS_CONVENTION = "numpy array of SimpleITK.GetArrayFromImage: axes (z, y, x); spacing listed in the same order"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


# What a file is, from its first bytes (file_format): errors say what was given, not only what failed to parse.
SAFETENSORS = "a safetensors file"
TORCH_ZIP = "a torch.save file (zip archive)"
TORCH_PICKLE = "a pickle (torch.save's legacy format)"


def file_format(path: str | os.PathLike) -> str:
    """:data:`SAFETENSORS`, :data:`TORCH_ZIP`, :data:`TORCH_PICKLE`, or a phrase saying what else the file is."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        return f"a file that cannot be read ({e.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, pickle protocols 2-5
        return TORCH_PICKLE
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return SAFETENSORS
    return f"neither safetensors nor a torch.save file (it starts with {head[:8]!r})"


@dataclass
class CheckpointMetadata:
    preset: str
    config: dict  # every MiMConfig field: rebuilds the architecture exactly
    spacing: list[float]  # pre-training spacing in mm, (z, y, x)
    intensity_window: list[float]  # HU [lo, hi] mapped to [0, 1]
    token_size: int = 16
    input_size: int = 96
    crop_size: int = 192
    axis_convention: str = AXIS_CONVENTION
    encoder_prefix: str = "encoder."
    corpus: dict = field(default_factory=dict)  # corpus fingerprint summary
    step: int = 0
    epoch: int = 0
    code_version: str = ""
    format_version: int = FORMAT_VERSION
    weights_sha256: str = ""
    metadata_sha256: str = ""  # of every other field (format 2); empty in format 1 files

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike = "<memory>") -> CheckpointMetadata:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: metadata is not valid JSON ({e})") from e
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise CheckpointError(f"{source}: metadata lacks the fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metadata_sha256(raw: dict) -> str:
    """sha256 of a metadata dict (as stored in the header) without its own ``metadata_sha256`` entry."""
    body = {k: v for k, v in raw.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: CheckpointMetadata) -> str:
    """Write weights + metadata atomically; returns the weights' sha256 (also stored in the metadata)."""
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata.weights_sha256 = weights_sha256(state)
    metadata.format_version = FORMAT_VERSION
    metadata.metadata_sha256 = ""
    metadata.metadata_sha256 = metadata_sha256(json.loads(metadata.to_json()))
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={METADATA_KEY: metadata.to_json()}))
    return metadata.weights_sha256


def read_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """The metadata alone (cheap: reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        found = file_format(path)
        if found == SAFETENSORS:
            raise CheckpointError(f"{path}: a safetensors file that cannot be read, truncated or corrupted ({e})") from e
        hint = (
            "; if it is the MiM authors' .pth, mim_nnunet_convert turns it into one"
            if found in (TORCH_ZIP, TORCH_PICKLE) else ""
        )  # fmt: skip
        raise CheckpointError(f"{path}: {found}, expected a MiM checkpoint (.safetensors){hint}") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not a MiM checkpoint (no '{METADATA_KEY}' metadata)")
    text = meta[METADATA_KEY]
    md = CheckpointMetadata.from_json(text, path)
    if md.format_version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {md.format_version}, this code reads {list(READABLE_VERSIONS)}"
        )
    if md.format_version >= 2:
        raw = json.loads(text)
        if not raw.get("metadata_sha256"):
            raise CheckpointError(f"{path}: format {md.format_version} metadata lacks its metadata_sha256")
        digest = metadata_sha256(raw)
        if digest != raw["metadata_sha256"]:
            raise CheckpointError(
                f"{path}: metadata sha256 {digest[:12]}... does not match the recorded "
                f"{raw['metadata_sha256'][:12]}... (the metadata was edited or corrupted)"
            )
    return md


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], CheckpointMetadata]:
    """Weights and metadata; with ``verify`` the sha256 must match the metadata's."""
    path = Path(path)
    md = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights cannot be read, the file is truncated or corrupted ({e})") from e
    if verify:
        digest = weights_sha256(state)
        if digest != md.weights_sha256:
            raise CheckpointError(
                f"{path}: weights sha256 {digest[:12]}... does not match the recorded {md.weights_sha256[:12]}... "
                "(the file was modified or corrupted)"
            )
    return state, md


def check_state_dict(
    source: str | os.PathLike, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or wrongly shaped key."""
    keys_l = {k for k in loaded if not k.startswith(ignore)}  # startswith(()) is False: nothing ignored
    keys_e = {k for k in expected if not k.startswith(ignore)}
    problems = []
    if missing := sorted(keys_e - keys_l):
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected := sorted(keys_l - keys_e):
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    shapes = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(keys_l & keys_e) if loaded[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + " | ".join(problems))


def save_resume_state(path: str | os.PathLike, state: dict) -> None:
    """Optimizer/scheduler/scaler/RNG/data position, written atomically (a local file: torch's format)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no resume state here") from e
    except (
        RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, AttributeError,
        ImportError, IndexError, KeyError, TypeError, UnicodeDecodeError,
    ) as e:  # fmt: skip -- what torch.load raises for the many ways a file can be broken
        first = " ".join(str(e).split())[:160]
        raise CheckpointError(f"{path}: resume state is truncated or corrupted ({type(e).__name__}: {first})") from e
