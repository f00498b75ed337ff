"""Where the nnU-Net trainer folder is, and the one environment line that makes nnU-Net find it.

``nnUNet_extTrainer`` must name the folder with the thin trainer modules. In a source checkout / editable install
that is the repository's ``trainers/``; an installed ``mim_nnunet_trainers`` package (if the wheel ships the folder
under that name) wins. ``python -m mim_nnunet.nnunet.paths`` prints the ``export`` line.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV = "nnUNet_extTrainer"


def trainer_folder() -> Path:
    spec = importlib.util.find_spec("mim_nnunet_trainers")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    folder = Path(__file__).resolve().parents[2] / "trainers"
    if not (folder / "nnUNetTrainerMiM.py").is_file():
        raise FileNotFoundError(f"no MiM trainer folder found (looked for {folder}/nnUNetTrainerMiM.py)")
    return folder


def ensure_ext_trainer(environ: dict | None = None) -> str:
    """Add the trainer folder to ``nnUNet_extTrainer`` in ``environ`` (default: this process); returns the value."""
    environ = os.environ if environ is None else environ
    folder = str(trainer_folder())
    parts = [p for p in environ.get(ENV, "").split(os.pathsep) if p]
    if folder not in parts:
        parts.append(folder)
    environ[ENV] = os.pathsep.join(parts)
    return environ[ENV]


def export_line() -> str:
    return f"export {ENV}={trainer_folder()}"


if __name__ == "__main__":
    print(export_line())
