"""Trainers of the label-efficiency study (``benchmarks/study_label_efficiency.py``).

Every arm of the study runs the same number of training iterations, and each run's seed must vary without
code changes, so these thin variants read their length and seed from the environment (nnU-Net trainers cannot
take extra constructor arguments, nnunet_facts.md):

- ``MIM_NNUNET_STUDY_EPOCHS`` x ``MIM_NNUNET_STUDY_ITERS`` training iterations (defaults 20 x 20, the demo's 400);
- ``MIM_NNUNET_STUDY_SEED``: the run seed (default 0): initialisation, patch sampling and every augmentation
  worker derive from it (``seeding.py``), so two arms at one seed see the same batches in the same order;
- ``MIM_NNUNET_STUDY_SNAPSHOT_EVERY``: also keep the weights every this many epochs (``snapshot_name``;
  default 0, none), so that the study scores the test set along a run (where has it converged?);
- one validation iteration per epoch, no test-time mirroring, and no final validation of the validation
  cases: the study scores a separate test set, and these costs would otherwise differ between the arms' networks.

Otherwise each class is its parent's recipe: ``nnUNetTrainerMiM`` (AdamW, layer decay, warm-up + cosine) at the
learning rate the demo measured for runs of a few hundred iterations (``nnUNetTrainerMiM_demo``: 1e-2), and the
stock ``nnUNetTrainer`` (SGD 1e-2, poly) unchanged. Names avoid nnU-Net's built-ins.
"""

from __future__ import annotations

import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .optim import scale_encoder_groups
from .seeding import SeededBatchesMixin, seed_everything
from .trainer import DEFAULT_DEVICE, nnUNetTrainerMiM

EPOCHS_ENV, ITERS_ENV, SEED_ENV = "MIM_NNUNET_STUDY_EPOCHS", "MIM_NNUNET_STUDY_ITERS", "MIM_NNUNET_STUDY_SEED"
SNAPSHOT_ENV = "MIM_NNUNET_STUDY_SNAPSHOT_EVERY"
#: the MiM arms' peak learning rate: nnUNetTrainerMiM_demo's, measured for runs of a few hundred iterations
STUDY_LR = 1e-2


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a non-negative integer") from None
    if n < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative integer")
    return n


def snapshot_name(iterations: int) -> str:
    """The file of a run's weights after ``iterations`` training iterations (next to checkpoint_final.pth)."""
    return f"checkpoint_it{iterations}.pth"


class _StudyMixin(SeededBatchesMixin):
    """Length and seed from the environment, cheap validation; applied after the parent's __init__."""

    def _study_setup(self) -> None:
        self.study_seed = self.run_seed = _env_int(SEED_ENV, 0)
        seed_everything(self.study_seed)
        self.num_epochs = max(1, _env_int(EPOCHS_ENV, 20))
        self.num_iterations_per_epoch = max(1, _env_int(ITERS_ENV, 20))
        self.num_val_iterations_per_epoch = 1
        self.snapshot_every = _env_int(SNAPSHOT_ENV, 0)

    def on_epoch_end(self):
        epoch = self.current_epoch  # nnU-Net's on_epoch_end counts it up
        super().on_epoch_end()
        done = epoch + 1
        if self.snapshot_every and done % self.snapshot_every == 0 and done < self.num_epochs:
            self.save_checkpoint(os.path.join(self.output_folder, snapshot_name(done * self.num_iterations_per_epoch)))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # no TTA: 8x the CPU inference time (nnunet_facts.md)
        return out

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("study trainer: final validation skipped (the study scores its own test set)")


class nnUNetTrainerMiM_study(_StudyMixin, nnUNetTrainerMiM):
    """MiM fine-tuning from the planned checkpoint (the MiM arm, and the MAE arm with its own plans)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=DEFAULT_DEVICE):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = STUDY_LR
        self._study_setup()


class nnUNetTrainerMiM_scratch_study(nnUNetTrainerMiM_study):
    """The same network and recipe, randomly initialised."""

    load_pretrained = False


class nnUNetTrainerMiM_lowenc_study(nnUNetTrainerMiM_study):
    """Diagnostic arm (why pre-training helps little, docs/study.md): the encoder's learning rates x ``encoder_lr_scale``, the decoder's not.

    At the study's lr (1e-2, layer decay 0.75) 200 AdamW iterations move the pre-trained encoder weights by 10-110 %
    of their norm (docs/study.md): this variant keeps them near their initialisation, to tell whether the
    pre-trained features help when they are kept.
    """

    encoder_lr_scale = 0.1

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        scale_encoder_groups(optimizer.param_groups, self.encoder_lr_scale)
        scheduler.step(0.0)  # the groups' lr from the new scales
        return optimizer, scheduler


class nnUNetTrainerMiM_scratch_lowenc_study(nnUNetTrainerMiM_lowenc_study):
    """The same low encoder learning rate from a random initialisation (the control of the diagnostic arm)."""

    load_pretrained = False


class nnUNetTrainerStock_study(_StudyMixin, nnUNetTrainer):
    """Stock nnU-Net (its network from its own plans, SGD + poly) at the study's length."""

    def __init__(self, plans, configuration, fold, dataset_json, device=DEFAULT_DEVICE):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._study_setup()
