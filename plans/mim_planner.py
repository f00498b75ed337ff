"""The MiM experiment planner for nnU-Net (thin: the class lives in ``mim_nnunet.nnunet.planner``).

nnU-Net has no plugin mechanism for planners: ``mim_nnunet_plan_and_preprocess`` runs this class through
``nnunetv2.experiment_planning.plan_and_preprocess_api``. Import it from here or from the package.
"""

from mim_nnunet.nnunet.planner import DEFAULT_PLANS_NAME, MiMPlanner  # noqa: F401
