"""The MiM authors' released pre-training checkpoint -> this project's checkpoint contract.

Owns the authors' file format: reading it safely, the tensor-name mapping (:data:`NAME_TABLE`, one table), the
numerical and axis differences to undo, and the exact inverse of all of it (:func:`to_authors_state`, which the
tests use to build an authors-format file from a project model: the authors' code is not part of this project).
Facts about their file: ``shared/design/authors_checkpoint.md``. What it must not do: load anything but the
``argparse.Namespace`` the file needs (no ``weights_only=False``), or touch nnU-Net.

Transforms, authors (x, y, z arrays, RAS) -> project (z, y, x arrays of SimpleITK):

- names: :data:`NAME_TABLE` (prefix rows) + :data:`LEAF_RENAMES` (names inside a block), ``module.`` stripped;
- every 5-D conv kernel: its three spatial axes reversed (a no-op for 1x1x1 kernels);
- position tables: token order transposed (grid (x, y, z) -> (z, y, x)); each token keeps its vector, so the
  sin-cos thirds stay in the authors' axis order, which :func:`~mim_nnunet.model.pos_embed.adapt_pos_embed`
  recognises and keeps when it recomputes the table for another grid;
- ``decoder_pred`` rows (voxels inside a 16^3 token): reordered from (x, y, z, c) to (z, y, x, c), assuming the
  authors patchify in C order of their array axes like this project does; only pre-training reads these rows;
- conv-stage LayerNorm eps 1e-5 (``MiMConfig.conv_ln_eps``), the ViT's 1e-6 unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import (
    SAFETENSORS,
    TORCH_PICKLE,
    TORCH_ZIP,
    CheckpointError,
    CheckpointMetadata,
    check_state_dict,
    file_format,
    read_metadata,
    save_checkpoint,
)
from .model.config import PRESETS, TOKEN_SIZE, MiMConfig, make_config

log = logging.getLogger(__name__)

AUTHORS_CONV_LN_EPS = 1e-5  # nn.LayerNorm's default in their PatchEmbed3d / CBlock3d norms
DDP_PREFIX = "module."
AUTHORS_FILE = "the MiM authors' pre-training checkpoint (torch.save dict with 'model', e.g. MiM_base.pth)"

# authors prefix -> project prefix; a row without a trailing "." is an exact name. Rows are tried in order and
# the first whose prefix matches wins; the remainder keeps its name up to LEAF_RENAMES[rule].
NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    # (authors, project, leaf rule)
    ("pos_embed", "encoder.pos_embed", ""),
    ("patch_embed1.proj.", "encoder.downsamples.0.0.", ""),
    ("patch_embed1.norm.", "encoder.downsamples.0.1.", ""),
    ("patch_embed2.proj.", "encoder.downsamples.1.0.", ""),
    ("patch_embed2.norm.", "encoder.downsamples.1.1.", ""),
    ("patch_embed3.proj.", "encoder.downsamples.2.0.", ""),
    ("patch_embed3.norm.", "encoder.downsamples.2.1.", ""),
    ("patch_embed4.proj.", "encoder.token_downsample.0.", ""),
    ("patch_embed4.norm.", "encoder.token_downsample.1.", ""),
    ("patch_embed5.", "encoder.token_proj.", ""),
    ("blocks1.", "encoder.stages.0.", "conv_block"),
    ("blocks2.", "encoder.stages.1.", "conv_block"),
    ("blocks3.", "encoder.stages.2.", "conv_block"),
    ("blocks4.", "encoder.blocks.", "mlp"),
    ("norm.", "encoder.norm.", ""),
    ("stage1_output_decode.", "fusion.0.", ""),
    ("stage2_output_decode.", "fusion.1.", ""),
    ("stage3_output_decode.", "fusion.2.", ""),
    ("mask_token", "decoder.mask_token", ""),
    ("decoder_pos_embed", "decoder.pos_embed", ""),
    ("decoder_embed.", "decoder.embed.", ""),
    ("decoder_blocks.", "decoder.blocks.", "mlp"),
    ("decoder_norm.", "decoder.norm.", ""),
    ("decoder_pred.", "decoder.head.", ""),
    # their alignment MLPs; aggregate_pred_up_feature never received gradients (authors_checkpoint.md)
    ("aggregate_pred_up_feature.", "align_heads.parent12.", "head"),
    ("aggregate_mid.", "align_heads.child12.", "head"),
    ("aggregate_pred_mid_feature.", "align_heads.parent23.", "head"),
    ("aggregate_down.", "align_heads.child23.", "head"),
)

# Names inside a block, authors -> project (the part after the block index for conv_block / mlp).
LEAF_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "": (),
    # CBlock3d: attn is the depthwise 5^3 conv, conv1/conv2 the pointwise convs around it
    "conv_block": (("conv1.", "pw1."), ("attn.", "dw."), ("conv2.", "pw2."), ("mlp.fc1.", "mlp.0."),
                   ("mlp.fc2.", "mlp.2.")),
    "mlp": (("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2.")),
    "head": (("fc1.", "0."), ("fc2.", "2.")),
}

POS_TABLES = ("encoder.pos_embed", "decoder.pos_embed")
DECODER_PRED = "decoder.head."


def _rename(name: str, rows: list[tuple[str, str, str]], leaf_index: int) -> str | None:
    """Map ``name`` through ``rows`` (src, dst, rule); ``leaf_index`` picks the direction of LEAF_RENAMES."""
    for src, dst, rule in rows:
        if src.endswith("."):
            if not name.startswith(src):
                continue
        elif name != src:
            continue
        rest = name[len(src):]
        if rule in ("conv_block", "mlp"):  # "<block index>.<leaf>"
            head, _, leaf = rest.partition(".")
            head += "."
        else:
            head, leaf = "", rest
        for pair in LEAF_RENAMES[rule]:
            if leaf.startswith(pair[leaf_index]):
                leaf = pair[1 - leaf_index] + leaf[len(pair[leaf_index]):]
                break
        return dst + head + leaf
    return None


def authors_to_project_name(name: str) -> str | None:
    """The project name of an authors' tensor name (``module.`` stripped), or None if the table has no row."""
    if name.startswith(DDP_PREFIX):
        name = name[len(DDP_PREFIX):]
    return _rename(name, list(NAME_TABLE), 0)


def project_to_authors_name(name: str) -> str | None:
    """Inverse of :func:`authors_to_project_name`."""
    return _rename(name, [(dst, src, rule) for src, dst, rule in NAME_TABLE], 1)


def _transpose_tokens(table: torch.Tensor, grid_from: tuple[int, int, int]) -> torch.Tensor:
    """``(1, L, D)`` table whose tokens are in C order of ``grid_from`` -> C order of the reversed grid."""
    n, length, dim = table.shape
    return table.reshape(n, *grid_from, dim).permute(0, 3, 2, 1, 4).reshape(n, length, dim).contiguous()


def _reorder_voxels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Rows of a voxel head, (a, b, c, ch) C order -> (c, b, a, ch); its own inverse. Weight or bias."""
    p = TOKEN_SIZE
    rest = weight.shape[1:]
    w = weight.reshape(p, p, p, channels, *rest).permute(2, 1, 0, 3, *range(4, 4 + len(rest)))
    return w.reshape(weight.shape).contiguous()


def _reorder(name: str, t: torch.Tensor, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
    """The axis transform of one tensor; each is its own inverse on a cubic token grid (reversal, transposition)."""
    if t.ndim == 5:  # conv kernel (out, in, a, b, c) -> (out, in, c, b, a)
        return t.permute(0, 1, 4, 3, 2).contiguous()
    if name in POS_TABLES:
        return _transpose_tokens(t, grid)
    if name.startswith(DECODER_PRED):
        return _reorder_voxels(t, channels)
    return t


def infer_config(state: dict[str, torch.Tensor], source: str) -> MiMConfig:
    """The preset whose shapes the authors' state has (dims, depths), its input size from the position table's
    token count, and conv LN eps 1e-5. Head counts are not in the shapes: they come from the preset."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    try:
        dims = tuple(int(state[f"patch_embed{i}.proj.weight"].shape[0]) for i in (1, 2, 3, 4))
        grid_tokens = int(state["pos_embed"].shape[1])
        in_channels = int(state["patch_embed1.proj.weight"].shape[1])
    except KeyError as e:
        raise CheckpointError(f"{source}: not a MiM pre-training state dict (no tensor {e.args[0]!r})") from None
    shape = dict(dims=dims, conv_depths=tuple(count(f"blocks{i}.") for i in (1, 2, 3)), depth=count("blocks4."),
                 decoder_depth=count("decoder_blocks."))
    grid = round(grid_tokens ** (1 / 3))
    if grid**3 != grid_tokens:
        raise CheckpointError(f"{source}: pos_embed has {grid_tokens} tokens, not a cubic token grid")
    for name, preset in PRESETS.items():
        if all(tuple(preset[k]) == v if isinstance(v, tuple) else preset[k] == v for k, v in shape.items()):
            return make_config(name, in_channels=in_channels, input_size=grid * TOKEN_SIZE,
                               conv_ln_eps=AUTHORS_CONV_LN_EPS)
    raise CheckpointError(
        f"{source}: the tensors describe dims {dims}, conv depths {shape['conv_depths']}, ViT depth {shape['depth']}, "
        f"decoder depth {shape['decoder_depth']}, {grid_tokens} tokens: no preset of {sorted(PRESETS)} has that shape"
    )


def authors_to_project_state(
    state: dict[str, torch.Tensor], config: MiMConfig, source: str = "<memory>"
) -> dict[str, torch.Tensor]:
    """Rename and reorder an authors' state dict; raises naming tensors that have no row in the table."""
    out, unknown = {}, []
    grid = (config.grid,) * 3
    for name, t in state.items():
        new = authors_to_project_name(name)
        if new is None:
            unknown.append(name)
            continue
        out[new] = _reorder(new, t, grid, config.in_channels)
    if unknown:
        raise CheckpointError(
            f"{source}: tensors with no MiM counterpart {sorted(unknown)[:8]}"
            f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)} in all)"
        )
    return out


def to_authors_state(state: dict[str, torch.Tensor], config: MiMConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`authors_to_project_state` (the tests build authors-format files with it)."""
    out = {}
    grid = (config.grid,) * 3
    for name, t in state.items():
        old = project_to_authors_name(name)
        if old is None:
            raise KeyError(f"project tensor {name!r} has no row in NAME_TABLE")
        out[old] = _reorder(name, t, grid, config.in_channels)
    return out


def read_authors_checkpoint(path: str | os.PathLike) -> dict:
    """The authors' ``torch.save`` dict, unpickled with ``weights_only=True`` and ``argparse.Namespace`` allowed.

    Any other global the pickle asks for (a custom class: code could run) is refused with a one-line error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    found = file_format(path)
    if found == SAFETENSORS:  # torch.load would read it too, and the error would blame the tensor names
        try:
            read_metadata(path)
            found = "already a MiM checkpoint of this project (use it as it is, e.g. as -pt of the planner)"
        except CheckpointError:
            pass
    if found not in (TORCH_ZIP, TORCH_PICKLE):
        raise CheckpointError(f"{path}: {found}; expected {AUTHORS_FILE}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines of advice (including "use weights_only=False"); keep the refused global
        text = str(e)
        if refused := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            raise CheckpointError(
                f"{path}: refused, the pickle asks for {refused.group(1)}; a MiM checkpoint needs only tensors and "
                "argparse.Namespace"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        raise CheckpointError(
            f"{path}: {found} that cannot be unpickled ({reason.group(1) if reason else _first_line(e)}); "
            f"expected {AUTHORS_FILE}"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        # a malformed pickle stream fails inside the unpickler with any of these
        raise CheckpointError(f"{path}: {found} that cannot be read ({_first_line(e)}); expected {AUTHORS_FILE}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}  # a bare state dict
    raise CheckpointError(f"{path}: expected the authors' dict with a 'model' state dict, got {type(obj).__name__}"
                          + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else ""))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    window: tuple[float, float] = (-1000.0, 1000.0),
) -> CheckpointMetadata:
    """Convert the authors' checkpoint ``src`` into a project checkpoint ``dst`` (safetensors + metadata)."""
    from .model.mim import MiMPretrainingModel

    src = Path(src)
    obj = read_authors_checkpoint(src)
    raw = obj["model"]
    state = {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in raw.items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: the 'model' entry holds non-tensor values")
    config = infer_config(state, str(src))
    expected = MiMPretrainingModel(config).state_dict()
    # Checked under the authors' names, the ones the user's file has.
    check_state_dict(src, state, to_authors_state(expected, config))
    converted = authors_to_project_state(state, config, str(src))
    converted = {k: v.to(expected[k].dtype) for k, v in converted.items()}
    epoch = obj.get("epoch")
    args = obj.get("args")
    md = CheckpointMetadata(
        preset=config.preset,
        config=config.to_dict(),
        spacing=[float(s) for s in spacing],
        intensity_window=[float(w) for w in window],
        token_size=TOKEN_SIZE,
        input_size=config.input_size,
        crop_size=2 * config.input_size,
        epoch=int(epoch) if isinstance(epoch, int) else 0,
        code_version="converted",
        corpus={
            "provenance": "converted",
            "source_file": src.name,
            "source_sha256": file_sha256(src),
            "authors_epoch": int(epoch) if isinstance(epoch, int) else None,
            "authors_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            if isinstance(args, argparse.Namespace) else {},
            "authors_orientation": "RAS, arrays (x, y, z); converted to (z, y, x) by axis reversal, no flips",
            "spacing_note": "the authors pre-trained at native spacing (no resampling); their fine-tuning uses "
                            "1.5 mm isotropic. The spacing above is the one given to the converter.",
        },
    )
    save_checkpoint(dst, converted, md)
    log.info("converted %s (%d tensors, preset %s, epoch %s) -> %s", src, len(converted), config.preset, epoch, dst)
    return md
