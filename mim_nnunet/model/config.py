"""Architecture and method configuration: one flat dataclass and the named presets (as data, timm-style).

``base`` is exactly the paper's sizes (mim_method.md §1-4). ``small`` and ``tiny`` keep the structure (four
stride-2 stages, token size 16, three levels) with fewer/narrower layers so that CPU tests and demos run fast.
The whole dataclass is what a checkpoint stores as "full kwargs"; fine-tuning rebuilds the encoder from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

TOKEN_SIZE = 16  # four stride-2 stages

PRESETS: dict[str, dict] = {
    "base": dict(
        dims=(48, 96, 192, 384), conv_depths=(2, 2, 2), depth=11, num_heads=12, input_size=96,
        decoder_dim=576, decoder_depth=8, decoder_heads=16,
    ),
    "small": dict(
        dims=(24, 48, 96, 192), conv_depths=(2, 2, 2), depth=4, num_heads=6, input_size=64,
        decoder_dim=192, decoder_depth=2, decoder_heads=6,
    ),
    "tiny": dict(
        dims=(8, 16, 32, 48), conv_depths=(1, 1, 1), depth=2, num_heads=4, input_size=32,
        decoder_dim=48, decoder_depth=1, decoder_heads=4,
    ),
}

# How the maths is executed, not what it computes: may differ between a checkpoint and the run resuming it.
EXECUTION_FIELDS = ("batch_levels", "packed", "grad_checkpointing", "checkpoint_chunk")

ENCODER_FIELDS = ("in_channels", "dims", "conv_depths", "depth", "num_heads", "mlp_ratio", "drop_path_rate",
                  "input_size", "conv_ln_eps", "grad_checkpointing", "checkpoint_chunk")

# LayerNorm eps of the conv stages (Downsample norms, ConvBlock norm1/norm2) in checkpoints natively
# pre-trained here: every LayerNorm of this project used 1e-6 before the field existed, so a checkpoint whose
# config lacks the field was trained with it. The authors' released weights use 1e-5 there (converted files
# carry 1e-5; authors_checkpoint.md); the ViT blocks use 1e-6 in both.
DEFAULT_CONV_LN_EPS = 1e-6


@dataclass(frozen=True)
class MiMConfig:
    """Everything that defines a MiM pre-training model. Sizes default to the ``base`` preset."""

    preset: str = "base"
    # hybrid encoder (§1)
    in_channels: int = 1
    dims: tuple[int, int, int, int] = (48, 96, 192, 384)
    conv_depths: tuple[int, int, int] = (2, 2, 2)
    depth: int = 11
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    input_size: int = 96  # S: every level's volumes are S^3; crops are (2S)^3
    conv_ln_eps: float = DEFAULT_CONV_LN_EPS  # conv-stage LayerNorm eps (1e-5 in converted authors' weights)
    # MAE decoder (§2)
    decoder_dim: int = 576
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # Mask in Mask (§3)
    levels: int = 3
    mask_ratios: tuple[float, ...] = (0.5, 0.6, 0.5)
    children_per_volume: int = 4  # level-3 volumes cut from each level-2 volume
    level1_masking: str = "octant"  # "octant" (MiM) or "token" (plain MAE masking, for ablations)
    # losses (§4)
    rec_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    align_weights: tuple[float, ...] = (0.1, 0.1)
    # "online" (the paper: both heads trained on the 2 - 2cos loss) or "ema" (BYOL-style target: a frozen EMA
    # copy of the parent head, which the loss cannot pull to a constant; mim_nnunet/pretrain/monitor.py)
    align_target: str = "online"
    align_ema: float = 0.99  # EMA momentum of the "ema" target per optimizer step; 1.0 = a frozen random target
    # execution (no effect on the maths)
    batch_levels: bool = True
    packed: bool = True  # compute visible voxels/tokens only (model/packed.py); False = dense reference
    grad_checkpointing: bool = False
    checkpoint_chunk: int = 4  # volumes per checkpointed conv call: bounds the recomputation's peak memory
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.input_size
        if s % (2 * TOKEN_SIZE):
            raise ValueError(f"input_size must be a multiple of {2 * TOKEN_SIZE} (an even token grid), got {s}")
        if not 1 <= self.levels <= 3:
            raise ValueError(f"levels must be 1, 2 or 3, got {self.levels}")
        for name, n in (("mask_ratios", self.levels), ("rec_weights", self.levels), ("align_weights", self.levels - 1)):
            if len(getattr(self, name)) < n:
                raise ValueError(f"{name} needs at least {n} entries for levels={self.levels}")
        if self.level1_masking not in ("octant", "token"):
            raise ValueError(f"level1_masking must be 'octant' or 'token', got {self.level1_masking!r}")
        if self.levels > 1 and self.level1_masking != "octant":
            raise ValueError("levels > 1 needs octant masking at level 1 (level 2 is cut from masked octants)")
        if self.align_target not in ("online", "ema"):
            raise ValueError(f"align_target must be 'online' or 'ema', got {self.align_target!r}")
        if not 0.0 <= self.align_ema <= 1.0:
            raise ValueError(f"align_ema must be in [0, 1], got {self.align_ema}")
        if self.dims[3] % 6 or self.decoder_dim % 6:
            raise ValueError("transformer and decoder widths must be divisible by 6 (3D sin-cos embedding)")
        if self.levels >= 3 and self.children_per_volume > self.num_masked(1):
            raise ValueError(
                f"children_per_volume={self.children_per_volume} exceeds the {self.num_masked(1)} masked tokens "
                "of a level-2 volume"
            )
        if self.levels >= 2 and self.num_masked(0) < 1:
            raise ValueError("level-1 mask ratio masks no octant: level 2 would be empty")

    @property
    def grid(self) -> int:
        return self.input_size // TOKEN_SIZE

    @property
    def num_tokens(self) -> int:
        return self.grid**3

    def num_masked(self, level: int) -> int:
        """Masked units of a volume at ``level`` (0-based): octants at level 1 (octant masking), tokens otherwise."""
        units = 8 if level == 0 and self.level1_masking == "octant" else self.num_tokens
        return units - int(units * (1.0 - self.mask_ratios[level]))

    def encoder_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ENCODER_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MiMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MiM config keys: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def make_config(preset: str = "base", **overrides) -> MiMConfig:
    """The preset's config with ``overrides`` applied (any :class:`MiMConfig` field)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = MiMConfig(preset=preset, **PRESETS[preset])
    return replace(cfg, **overrides) if overrides else cfg


def preset_crop_size(preset: str) -> int:
    """Edge of the crops a preset trains on, in voxels: every level's volumes are S^3, the crops (2S)^3."""
    return 2 * make_config(preset).input_size
