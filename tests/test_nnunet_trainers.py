"""nnU-Net finds the MiM trainers through nnUNet_extTrainer; the checkpoint path comes from plans or env."""

from __future__ import annotations

import pytest

from mim_nnunet.checkpoint import CheckpointError
from mim_nnunet.nnunet.paths import ensure_ext_trainer, trainer_folder
from mim_nnunet.nnunet.trainer import CHECKPOINT_ENV, planned_checkpoint


@pytest.mark.parametrize("name", ["nnUNetTrainerMiM", "nnUNetTrainerMiM_scratch", "nnUNetTrainerMiM_debug"])
def test_stock_lookup_finds_our_trainers(monkeypatch, name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import mim_nnunet.nnunet.trainer as trainer_module

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    env: dict = {}
    ensure_ext_trainer(env)
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
    assert env["nnUNet_extTrainer"] == str(trainer_folder())
    assert recursive_find_trainer_class_by_name(name) is getattr(trainer_module, name)


def test_variants_change_one_thing():
    from mim_nnunet.nnunet import trainer as t

    assert t.nnUNetTrainerMiM.load_pretrained and not t.nnUNetTrainerMiM_scratch.load_pretrained
    assert issubclass(t.nnUNetTrainerMiM_scratch, t.nnUNetTrainerMiM)
    assert t.nnUNetTrainerMiM_scratch_debug.__mro__[1] is t.nnUNetTrainerMiM_debug


def test_checkpoint_path_from_plans_or_env(monkeypatch):
    plans = {"plans_name": "MiMPlans", "mim": {"checkpoint": {"path": "/a/ckpt.safetensors", "sha256": "ab"}}}
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    assert planned_checkpoint(plans) == ("/a/ckpt.safetensors", "ab")
    monkeypatch.setenv(CHECKPOINT_ENV, "/b/moved.safetensors")
    assert planned_checkpoint(plans) == ("/b/moved.safetensors", "ab")
    with pytest.raises(CheckpointError, match="no MiM checkpoint record"):
        planned_checkpoint({"plans_name": "nnUNetPlans"})


def test_installed_trainer_folder_is_a_copy_of_trainers():
    from pathlib import Path

    import mim_nnunet.nnunet

    repo = Path(__file__).resolve().parents[1] / "trainers" / "nnUNetTrainerMiM.py"
    installed = Path(mim_nnunet.nnunet.__file__).parent / "ext_trainers" / "nnUNetTrainerMiM.py"
    assert installed.read_text() == repo.read_text()
