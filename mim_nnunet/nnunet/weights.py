"""Loading a MiM pre-training checkpoint into the segmentation network's encoder (mim_method.md §6).

Owns the fine-tuning side of the checkpoint contract: verify (format, sha256, architecture, keys, shapes), adapt
(position embedding: the exact sin-cos table of the patch's token grid through :func:`adapt_pos_embed`, the one
adaptation path; stem weights repeated for multi-channel input), load. Fusion convs, MAE decoder, mask token and alignment heads
are dropped because only ``encoder.*`` tensors are read. Errors are :class:`CheckpointError` naming the file and
what does not match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, CheckpointMetadata, check_state_dict, load_checkpoint
from ..model.config import DEFAULT_CONV_LN_EPS, TOKEN_SIZE, MiMConfig
from ..model.encoder import HybridEncoder
from ..model.pos_embed import adapt_pos_embed
from ..model.segmentation import MiMSegmentationNetwork

# Encoder-shape fields of MiMConfig that must agree between checkpoint and network.
ARCH_FIELDS = ("dims", "conv_depths", "depth", "num_heads", "mlp_ratio", "conv_ln_eps")
# A checkpoint's config written before a field existed was trained with the field's default.
ARCH_DEFAULTS = {"conv_ln_eps": DEFAULT_CONV_LN_EPS}
STEM_KEY = "downsamples.0.0.weight"


@dataclass
class LoadReport:
    path: str
    sha256: str
    preset: str
    tensors: int
    pos_grid_from: tuple[int, ...]
    pos_grid_to: tuple[int, ...]
    stem_repeated: int  # input channels the 1-channel stem was repeated to (1 = unchanged)
    pos_method: str = "unchanged"  # unchanged | recomputed | resampled (model/pos_embed.adapt_pos_embed)

    def __str__(self) -> str:
        return (
            f"MiM encoder loaded from {self.path} (preset {self.preset}, sha256 {self.sha256[:12]}...): "
            f"{self.tensors} tensors; position embedding {self.pos_grid_from} -> {self.pos_grid_to} ({self.pos_method})"
            + (f"; stem repeated to {self.stem_repeated} channels" if self.stem_repeated > 1 else "")
        )


def check_architecture(path: str | os.PathLike, md: CheckpointMetadata, arch_kwargs: dict) -> None:
    """The checkpoint's encoder must be the architecture the plans built (names the differing fields)."""
    diffs = []
    for k in ARCH_FIELDS:
        have = md.config.get(k, ARCH_DEFAULTS.get(k))
        want = arch_kwargs.get(k, ARCH_DEFAULTS.get(k)) if k in ARCH_DEFAULTS else arch_kwargs.get(k)
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        if want is not None and norm(have) != norm(want):
            diffs.append(f"{k}: checkpoint {have} vs plans {want}")
    if diffs:
        raise CheckpointError(
            f"{path}: checkpoint of preset {md.preset!r} does not match the network in the plans ("
            + "; ".join(diffs)
            + "). Re-plan with this checkpoint (mim_nnunet_plan_and_preprocess -pt) or use the checkpoint the plans name."
        )


def adapt_encoder_state(
    encoder_state: dict[str, torch.Tensor],
    md: CheckpointMetadata,
    target: dict[str, torch.Tensor],
    target_grid: tuple[int, int, int],
    source: str,
) -> tuple[dict[str, torch.Tensor], tuple[int, ...], int, str]:
    """Adapt the position embedding to ``target_grid`` and repeat the stem over input channels.

    Returns the adapted state, the checkpoint's token grid, the channel count the stem was repeated to and how the
    position table was obtained (see :func:`adapt_pos_embed`).
    """
    state = dict(encoder_state)
    size = md.config.get("input_size", md.input_size)
    old_grid = (size // TOKEN_SIZE,) * 3
    pos_method = "unchanged"
    if "pos_embed" in state:
        if state["pos_embed"].shape[1] != old_grid[0] * old_grid[1] * old_grid[2]:
            raise CheckpointError(
                f"{source}: pos_embed has {state['pos_embed'].shape[1]} tokens, the metadata's input_size {size} "
                f"implies the grid {old_grid}"
            )
        state["pos_embed"], pos_method = adapt_pos_embed(state["pos_embed"], old_grid, target_grid)
    repeated = 1
    if STEM_KEY in state and STEM_KEY in target:
        have, want = state[STEM_KEY].shape[1], target[STEM_KEY].shape[1]
        if have == 1 and want > 1:
            # Same response to an image repeated over all channels as the 1-channel stem to that image.
            state[STEM_KEY] = state[STEM_KEY].repeat(1, want, 1, 1, 1) / want
            repeated = want
    return state, old_grid, repeated, pos_method


def load_pretrained_encoder(
    network: MiMSegmentationNetwork,
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    arch_kwargs: dict | None = None,
) -> LoadReport:
    """Verify the checkpoint and copy its encoder into ``network.encoder`` (strict: every tensor)."""
    path = Path(path)
    state, md = load_checkpoint(path, verify=True)  # format version + weights sha256 vs its own metadata
    if expected_sha256 and md.weights_sha256 != expected_sha256:
        raise CheckpointError(
            f"{path}: weights sha256 {md.weights_sha256[:12]}... is not the {expected_sha256[:12]}... the plans were "
            "made with (a different or re-trained checkpoint). Re-plan with it or point MIM_NNUNET_CHECKPOINT at the "
            "checkpoint the plans name."
        )
    if arch_kwargs is not None:
        check_architecture(path, md, arch_kwargs)
    prefix = md.encoder_prefix
    encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise CheckpointError(f"{path}: no tensors under the encoder prefix {prefix!r}")
    target = network.encoder.state_dict()
    grid = tuple(network.encoder.pos_grid)
    adapted, old_grid, repeated, pos_method = adapt_encoder_state(encoder_state, md, target, grid, str(path))
    check_state_dict(path, adapted, target)
    network.encoder.load_state_dict(adapted, strict=True)
    return LoadReport(str(path), md.weights_sha256, md.preset, len(adapted), old_grid, grid, repeated, pos_method)


def load_encoder(path: str | os.PathLike, input_size: int | tuple[int, int, int] | None = None) -> HybridEncoder:
    """The verified pre-trained :class:`HybridEncoder` of a MiM checkpoint, in eval mode (no nnU-Net needed).

    Built from the checkpoint's config (``conv_ln_eps`` included); ``input_size`` (default: the pre-training
    input) sets the token grid of its position table, adapted like at fine-tuning. Any input whose axes are
    multiples of 16 works either way. ``forward`` returns the three conv-stage maps and the normed token map.
    """
    path = Path(path)
    state, md = load_checkpoint(path, verify=True)
    kwargs = MiMConfig.from_dict(md.config).encoder_kwargs()
    if input_size is not None:
        kwargs["input_size"] = input_size
    kwargs["grad_checkpointing"] = False
    encoder = HybridEncoder(**kwargs)
    prefix = md.encoder_prefix
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise CheckpointError(f"{path}: no tensors under the encoder prefix {prefix!r}")
    target = encoder.state_dict()
    adapted, *_ = adapt_encoder_state(encoder_state, md, target, tuple(encoder.pos_grid), str(path))
    check_state_dict(path, adapted, target)
    encoder.load_state_dict(adapted, strict=True)
    return encoder.eval()
