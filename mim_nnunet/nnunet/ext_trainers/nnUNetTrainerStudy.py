"""The label-efficiency study's trainers (benchmarks/study_label_efficiency.py), for ``nnUNet_extTrainer``.

Thin on purpose, like nnUNetTrainerMiM.py: the classes live in ``mim_nnunet.nnunet.study_trainers``.
"""

from mim_nnunet.nnunet.study_trainers import (  # noqa: F401
    nnUNetTrainerMiM_lowenc_study,
    nnUNetTrainerMiM_scratch_lowenc_study,
    nnUNetTrainerMiM_scratch_study,
    nnUNetTrainerMiM_study,
    nnUNetTrainerStock_study,
)
