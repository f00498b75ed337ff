"""MiM trainers for nnU-Net: the folder named by ``nnUNet_extTrainer`` (see docs/finetuning.md).

Thin on purpose: nnU-Net imports this file as a top-level module and drops it from sys.modules after the lookup;
the classes live in the installed package (``mim_nnunet.nnunet.trainer``).
"""

from mim_nnunet.nnunet.trainer import (  # noqa: F401
    nnUNetTrainerMiM,
    nnUNetTrainerMiM_50epochs,
    nnUNetTrainerMiM_100epochs,
    nnUNetTrainerMiM_250epochs,
    nnUNetTrainerMiM_debug,
    nnUNetTrainerMiM_demo,
    nnUNetTrainerMiM_scratch,
    nnUNetTrainerMiM_scratch_50epochs,
    nnUNetTrainerMiM_scratch_100epochs,
    nnUNetTrainerMiM_scratch_250epochs,
    nnUNetTrainerMiM_scratch_debug,
    nnUNetTrainerMiM_scratch_demo,
    nnUNetTrainerMiM_smoke,
)
