"""mim-nnunet: MiM (Mask in Mask) self-supervised pre-training for 3D CT, plugged into nnU-Net v2.

The model API is imported lazily, so that parts which need no model code (the submission tools, the data
layer) do not load it: ``import mim_nnunet.submission`` stays free of pre-training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "mim_nnunet.model.config",
    "MiMConfig": "mim_nnunet.model.config",
    "make_config": "mim_nnunet.model.config",
    "HybridEncoder": "mim_nnunet.model.encoder",
    "LevelOutput": "mim_nnunet.model.mim",
    "MiMOutput": "mim_nnunet.model.mim",
    "MiMPretrainingModel": "mim_nnunet.model.mim",
}

if TYPE_CHECKING:
    from .model.config import PRESETS, MiMConfig, make_config
    from .model.encoder import HybridEncoder
    from .model.mim import LevelOutput, MiMOutput, MiMPretrainingModel


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim_nnunet' has no attribute {name!r}")


def build_encoder(preset: str = "base", **overrides) -> HybridEncoder:
    """The hybrid encoder of a preset (any :class:`MiMConfig` field may be overridden)."""
    from .model.config import make_config
    from .model.encoder import HybridEncoder

    return HybridEncoder(**make_config(preset, **overrides).encoder_kwargs())


def load_encoder(path, input_size: int | tuple[int, int, int] | None = None) -> HybridEncoder:
    """The verified pre-trained hybrid encoder of a MiM checkpoint (ours or converted), in eval mode."""
    from .nnunet.weights import load_encoder as _load

    return _load(path, input_size)


def build_pretraining_model(preset: str = "base", **overrides) -> MiMPretrainingModel:
    """The MiM pre-training model of a preset (any :class:`MiMConfig` field may be overridden)."""
    from .model.config import make_config
    from .model.mim import MiMPretrainingModel

    return MiMPretrainingModel(make_config(preset, **overrides))


__all__ = [
    "PRESETS", "HybridEncoder", "LevelOutput", "MiMConfig", "MiMOutput", "MiMPretrainingModel",
    "build_encoder", "build_pretraining_model", "load_encoder", "make_config", "__version__",
]
