"""Installed copy of the repository's ``trainers/`` folder, for wheel installs (which do not ship ``trainers/``).

nnU-Net imports the modules of this folder as top-level modules; ``tests/test_nnunet_trainers.py`` keeps the copy
identical to ``trainers/``. :func:`mim_nnunet.nnunet.paths.trainer_folder` picks the folder to name.
"""
