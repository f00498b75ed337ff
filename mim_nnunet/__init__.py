"""mim-nnunet: MiM (Mask in Mask) self-supervised pre-training for 3D CT, plugged into nnU-Net v2."""

from __future__ import annotations

__version__ = "0.1.0"

from .model.config import PRESETS, MiMConfig, make_config
from .model.encoder import HybridEncoder
from .model.mim import LevelOutput, MiMOutput, MiMPretrainingModel


def build_encoder(preset: str = "base", **overrides) -> HybridEncoder:
    """The hybrid encoder of a preset (any :class:`MiMConfig` field may be overridden)."""
    return HybridEncoder(**make_config(preset, **overrides).encoder_kwargs())


def build_pretraining_model(preset: str = "base", **overrides) -> MiMPretrainingModel:
    """The MiM pre-training model of a preset (any :class:`MiMConfig` field may be overridden)."""
    return MiMPretrainingModel(make_config(preset, **overrides))


__all__ = [
    "PRESETS", "HybridEncoder", "LevelOutput", "MiMConfig", "MiMOutput", "MiMPretrainingModel",
    "build_encoder", "build_pretraining_model", "make_config", "__version__",
]
