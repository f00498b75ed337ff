"""Where the nnU-Net trainer folder is, and the one environment line that makes nnU-Net find it.

``nnUNet_extTrainer`` must name the folder with the thin trainer modules. In a source checkout / editable install
that is the repository's ``trainers/``; a regular (wheel) install has no ``trainers/``, so the package carries an
identical copy in ``mim_nnunet/nnunet/ext_trainers/``. ``python -m mim_nnunet.nnunet.paths`` prints the
``export`` line.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "nnUNet_extTrainer"


TRAINER_MODULE = "nnUNetTrainerMiM.py"


def trainer_folder() -> Path:
    """The repository's ``trainers/`` if this package runs from a checkout, else the installed copy."""
    for folder in (
        Path(__file__).resolve().parents[2] / "trainers",
        Path(__file__).resolve().parent / "ext_trainers",
    ):
        if (folder / TRAINER_MODULE).is_file():
            return folder
    raise FileNotFoundError(
        f"no MiM trainer folder found (looked for {TRAINER_MODULE} in trainers/ and ext_trainers/)"
    )


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
