"""nnU-Net trainers for MiM fine-tuning (mim_method.md §6). ``trainers/`` re-exports these classes.

Owns the recipe inside nnU-Net's loop: the network from the plans (static, so the predictor can build it without
a trainer), the pre-trained encoder loaded at training start (never in ``build_network_architecture``, so that
prediction works without the pre-training checkpoint), AdamW with layer-wise LR decay and a per-iteration
warm-up + cosine schedule, drop-path (``drop_path_rate`` in the plans), nnU-Net's gradient clipping (norm 12) and
AMP on CUDA (both from nnU-Net's ``train_step``). Variants change one thing, nnU-Net style.

The checkpoint is the one the plans name (``plans['mim']['checkpoint']``); ``MIM_NNUNET_CHECKPOINT`` overrides
its path (the file must still have the planned sha256).
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from ..checkpoint import CheckpointError
from .optim import WarmupCosineLR, param_groups_layer_decay
from .seeding import SeededBatchesMixin, seed_everything
from .weights import load_pretrained_encoder

CHECKPOINT_ENV = "MIM_NNUNET_CHECKPOINT"
# A run seed: initialisation, patch sampling and every augmentation worker derive from it, so two runs at one
# seed see the same batches in the same order (seeding.py). Unset: nnU-Net's behaviour, unseeded.
SEED_ENV = "MIM_NNUNET_SEED"
NETWORK_CLASS = "mim_nnunet.model.segmentation.MiMSegmentationNetwork"
DEFAULT_DEVICE = torch.device("cuda")  # nnU-Net's trainer signature default


def planned_checkpoint(plans: dict) -> tuple[str, str]:
    """(path, sha256) of the pre-training checkpoint: the plans' record, the path overridable by the env var."""
    record = plans.get("mim", {}).get("checkpoint")
    if record is None:
        raise CheckpointError(
            f"plans {plans.get('plans_name')!r} carry no MiM checkpoint record: plan with mim_nnunet_plan_and_preprocess"
        )
    return os.environ.get(CHECKPOINT_ENV) or record["path"], record["sha256"]


def env_seed(name: str = SEED_ENV) -> int | None:
    """The run seed from the environment variable ``name``; None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer seed") from None


class nnUNetTrainerMiM(SeededBatchesMixin, nnUNetTrainer):
    """Fine-tunes the MiM encoder + U-shaped decoder planned by ``mim_nnunet_plan_and_preprocess``."""

    load_pretrained = True
    layer_decay = 0.75
    warmup_fraction = 0.05  # the paper's 50 warm-up epochs of nnU-Net's 1000

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.run_seed = env_seed()
        if self.run_seed is not None:
            seed_everything(self.run_seed)
            self.print_to_log_file(f"MiM: seeded with {SEED_ENV}={self.run_seed} (initialisation and every batch)")
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5
        self._iteration_in_epoch = 0

    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        name = configuration_manager.network_arch_class_name
        if name != NETWORK_CLASS:
            raise RuntimeError(
                f"plans {plans_manager.plans_name!r} describe the network {name}; MiM trainers need {NETWORK_CLASS}. "
                "Use the plans written by mim_nnunet_plan_and_preprocess (-p)."
            )
        return get_network_from_plans(
            name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=False,
            deep_supervision=enable_deep_supervision,
        )

    def _bare_network(self) -> nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    def configure_optimizers(self):
        kw = self.configuration_manager.network_arch_init_kwargs
        groups = param_groups_layer_decay(
            self.network, self.weight_decay, self.layer_decay, kw["conv_depths"], kw["depth"]
        )
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=(0.9, 0.999))
        scheduler = WarmupCosineLR(
            optimizer, self.initial_lr, self.num_epochs, self.warmup_fraction * self.num_epochs
        )
        return optimizer, scheduler

    def load_pretrained_weights(self) -> None:
        path, sha = planned_checkpoint(self.plans_manager.plans)
        report = load_pretrained_encoder(
            self._bare_network(), path, sha, self.configuration_manager.network_arch_init_kwargs
        )
        self.print_to_log_file(str(report))

    def heads_summary(self) -> str:
        """One line: the network's output channels, what they are (labels or regions) and nnU-Net's loss."""
        heads = self._bare_network().decoder.seg_layers[0].out_channels
        lm = self.label_manager
        if lm.has_regions:
            what = f"regions {lm.foreground_regions} (sigmoid)"
        else:
            what = f"labels {[int(v) for v in lm.all_labels]} (softmax)"
        loss = getattr(self.loss, "loss", self.loss)  # inside nnU-Net's DeepSupervisionWrapper
        return f"MiM: {heads} output heads for {lm.num_segmentation_heads} {what}, loss {type(loss).__name__}"

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        # Before nnU-Net starts its data-loader workers, so that a bad checkpoint fails with its own message first.
        # Only a fresh run loads the encoder: --c resumes from nnU-Net's checkpoint (current_epoch > 0).
        if self.load_pretrained and self.current_epoch == 0:
            self.load_pretrained_weights()
        elif not self.load_pretrained:
            self.print_to_log_file("MiM: training from scratch (no pre-trained weights)")
        self.print_to_log_file(self.heads_summary())
        super().on_train_start()

    def on_train_epoch_start(self):
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        # Per-iteration warm-up/cosine (nnU-Net only steps the scheduler once per epoch).
        self.lr_scheduler.step(self.current_epoch + self._iteration_in_epoch / self.num_iterations_per_epoch)
        self._iteration_in_epoch += 1
        return super().train_step(batch)


class nnUNetTrainerMiM_scratch(nnUNetTrainerMiM):
    """The identical network and recipe (layer decay included), randomly initialised: the baseline."""

    load_pretrained = False


class nnUNetTrainerMiM_debug(nnUNetTrainerMiM):
    """The same trainer, 2 epochs of 5 iterations (2 validation iterations): CPU checks and CI.

    Also no mirroring at inference (validation and prediction; training augmentation unchanged): 8-fold test-time
    mirroring dominates CPU time (nnunet_facts.md).
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 2

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out


class nnUNetTrainerMiM_scratch_debug(nnUNetTrainerMiM_debug):
    load_pretrained = False


class nnUNetTrainerMiM_smoke(nnUNetTrainerMiM_debug):
    """The debug trainer at its shortest: 1 epoch of 2 iterations (1 validation iteration), then nnU-Net's final
    validation. For end-to-end checks of what surrounds training (output heads, loss, prediction, submission) on
    a 2-core CPU: it trains nothing worth scoring."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerMiM_demo(nnUNetTrainerMiM_debug):
    """The debug trainer at demo length: 20 epochs of 20 iterations (5 validation iterations), no TTA mirroring,
    and a learning rate for that length: 1e-2 instead of the paper's 1e-4, which is made for 1000 epochs.

    Measured on the demo's phantoms (docs/finetuning.md): after 200 iterations the mean validation Dice was
    0.001 at 1e-4 and at 1e-3, 0.117 at 3e-3, 0.159 and 0.000 (two runs) at 1e-2; after 400 iterations at 1e-2,
    0.458. Hence 400.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 5
        self.initial_lr = 1e-2


class nnUNetTrainerMiM_scratch_demo(nnUNetTrainerMiM_demo):
    load_pretrained = False


# Length variants (nnU-Net's default is 1000 epochs of 250 iterations); warm-up stays 5 % of the run.
class nnUNetTrainerMiM_50epochs(nnUNetTrainerMiM):
    def __init__(self, plans, configuration, fold, dataset_json, device=DEFAULT_DEVICE):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerMiM_100epochs(nnUNetTrainerMiM):
    def __init__(self, plans, configuration, fold, dataset_json, device=DEFAULT_DEVICE):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class nnUNetTrainerMiM_250epochs(nnUNetTrainerMiM):
    def __init__(self, plans, configuration, fold, dataset_json, device=DEFAULT_DEVICE):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class nnUNetTrainerMiM_scratch_50epochs(nnUNetTrainerMiM_50epochs):
    load_pretrained = False


class nnUNetTrainerMiM_scratch_100epochs(nnUNetTrainerMiM_100epochs):
    load_pretrained = False


class nnUNetTrainerMiM_scratch_250epochs(nnUNetTrainerMiM_250epochs):
    load_pretrained = False
