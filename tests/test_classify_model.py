"""The classifier network, its loading through the segmentation path, and the plan's decisions."""

from __future__ import annotations

import shutil

import pytest
import torch
from classify_helpers import make_checkpoint, make_dataset
from safetensors.torch import save_file

from mim_nnunet.checkpoint import CheckpointError
from mim_nnunet.classify.dataset import load_dataset
from mim_nnunet.classify.model import MiMClassifier
from mim_nnunet.classify.plan import PlanError, PlanRequest, network_kwargs, plan_classification
from mim_nnunet.model.config import make_config
from mim_nnunet.model.pos_embed import sincos_pos_embed_3d
from mim_nnunet.nnunet.weights import load_pretrained_encoder

TINY = network_kwargs(make_config("tiny"), 1, 0.0)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_the_head_gives_one_logit_per_class_for_any_multiple_of_16(pooling):
    net = MiMClassifier(3, (32, 48, 32), pooling=pooling, **TINY).eval()
    assert net(torch.rand(2, 1, 32, 48, 32)).shape == (2, 3)
    assert net.features(torch.rand(1, 1, 32, 48, 32)).shape == (1, TINY["dims"][3])


def test_mean_pooling_is_the_authors_head_and_attention_pooling_weights_tokens():
    torch.manual_seed(0)
    net = MiMClassifier(2, (32, 32, 32), **TINY).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    _, tokens = net.encoder.forward_conv(x)
    tokens = net.encoder.forward_blocks(tokens)
    feature = net.fc_norm(tokens.mean(1))  # mean over the last stage's tokens, LayerNorm, Linear
    assert torch.allclose(net.features(x), feature, atol=1e-6)
    assert torch.allclose(net(x), net.head(feature), atol=1e-7)
    att = MiMClassifier(2, (32, 32, 32), pooling="attention", **TINY).eval()
    att.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        att.pool.score.weight.zero_()  # equal scores: attention pooling is the mean
    assert torch.allclose(att.features(x), feature, atol=1e-5)
    with torch.no_grad():
        att.pool.score.weight.normal_()
    assert not torch.allclose(att.features(x), feature, atol=1e-2)


def test_the_checkpoint_loads_through_the_segmentation_path(tmp_path):
    path = tmp_path / "tiny.safetensors"
    model, sha = make_checkpoint(path)
    net = MiMClassifier(2, (32, 48, 32), **TINY)
    report = load_pretrained_encoder(net, path, sha, TINY)
    assert report.pos_method == "recomputed" and report.pos_grid_to == (2, 3, 2)
    theirs = model.encoder.state_dict()
    for k, v in net.encoder.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, theirs[k]), k
    assert torch.allclose(net.encoder.pos_embed[0], sincos_pos_embed_3d(TINY["dims"][3], (2, 3, 2)))
    other = network_kwargs(make_config("small"), 1, 0.0)
    with pytest.raises(CheckpointError, match="dims"):
        load_pretrained_encoder(MiMClassifier(2, (32, 32, 32), **other), path, sha, other)


def test_the_linear_probe_freezes_the_encoder_in_eval_mode():
    net = MiMClassifier(2, (32, 32, 32), **(TINY | {"drop_path_rate": 0.2}))
    net.freeze_encoder()
    net.train()
    assert not net.encoder.training and net.head.training
    assert all(not p.requires_grad for p in net.encoder.parameters())
    net(torch.rand(2, 1, 32, 32, 32)).sum().backward()
    assert net.head.weight.grad is not None and all(p.grad is None for p in net.encoder.parameters())


# ------------------------------------------------------------------------------------------------ the plan


@pytest.fixture
def ds(tmp_path):
    return load_dataset(make_dataset(tmp_path / "ds", {"bright": 3, "dark": 3}))


def test_the_plan_takes_spacing_and_window_from_the_checkpoint_and_sizes_from_the_cases(ds, tmp_path):
    path = tmp_path / "tiny.safetensors"
    _, sha = make_checkpoint(path)
    plan = plan_classification(ds, path, PlanRequest(), n_train=5)
    assert plan.spacing == [1.5, 1.5, 1.5] and plan.window == [-1000.0, 1000.0]
    assert plan.normalization == ["ct_window"] and plan.classes == ["bright", "dark"]
    # the cases are 28^3 (42 mm) at 1.5 mm, one 40x44x40: the median rounds to 32 per axis
    assert plan.input_size == [32, 32, 32]
    assert plan.batch_size == 5  # the memory target allows more; capped by the training cases
    assert plan.checkpoint["sha256"] == sha and plan.checkpoint["config"]["preset"] == "tiny"
    assert {"spacing", "window", "input_and_batch", "fit", "mode"} <= set(plan.reasons)
    net = plan.build_network()
    assert net(torch.rand(1, 1, *plan.input_size)).shape == (1, 2)


def test_the_plan_honours_overrides_and_a_small_memory_target_shrinks_the_input(ds, tmp_path):
    path = tmp_path / "tiny.safetensors"
    make_checkpoint(path)
    req = PlanRequest(spacing=[3.0], window=[-200, 300], input_size=[16, 32, 48], batch_size=3, pooling="attention")
    plan = plan_classification(ds, path, req, n_train=5)
    assert (plan.spacing, plan.window, plan.input_size, plan.batch_size) == ([3.0] * 3, [-200.0, 300.0], [16, 32, 48], 3)
    big = plan_classification(ds, path, PlanRequest(spacing=[0.5]), n_train=5)  # 84^3 voxels at 0.5 mm
    small = plan_classification(ds, path, PlanRequest(spacing=[0.5], memory_target_gib=0.52), n_train=5)
    assert min(big.input_size) >= 80 and all(s <= b for s, b in zip(small.input_size, big.input_size))
    assert small.input_size != big.input_size
    with pytest.raises(PlanError, match="multiples of 16"):
        plan_classification(ds, path, PlanRequest(input_size=[30, 32, 32]), n_train=5)


def test_a_file_that_is_not_a_mim_checkpoint_is_refused_by_name(ds, tmp_path):
    junk = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, junk)
    with pytest.raises(PlanError) as e:
        plan_classification(ds, junk, PlanRequest(), n_train=5)
    assert str(junk) in str(e.value) and "expected a MiM checkpoint" in str(e.value) and "\n" not in str(e.value)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(PlanError, match="not a MiM checkpoint"):
        plan_classification(ds, bare, PlanRequest(), n_train=5)


def test_a_non_ct_channel_is_refused_unless_allowed_then_z_scored(tmp_path):
    import json

    import numpy as np

    from mim_nnunet.classify.images import load_case

    root = make_dataset(tmp_path / "mc", {"bright": 2, "dark": 2}, varied=False)
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(info | {"channel_names": {"0": "CT", "1": "T2"}}))
    for p in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(p, p.with_name(p.name.replace("_0000", "_0001")))
    ds = load_dataset(root)
    path = tmp_path / "tiny.safetensors"
    make_checkpoint(path)
    with pytest.raises(PlanError) as e:
        plan_classification(ds, path, PlanRequest(), n_train=4)
    assert "dataset.json" in str(e.value) and "'T2'" in str(e.value) and "--allow-non-ct" in str(e.value)
    plan = plan_classification(ds, path, PlanRequest(allow_non_ct=True), n_train=4)
    assert plan.normalization == ["ct_window", "zscore"] and plan.network["in_channels"] == 2
    x = load_case(ds.images[ds.cases[0]], plan.spacing, plan.window, plan.normalization)
    assert x.shape[0] == 2 and 0 <= x[0].min() and x[0].max() <= 1
    assert abs(float(x[1].mean())) < 1e-3 and abs(float(x[1].std()) - 1) < 1e-2
    assert plan.build_network()(torch.from_numpy(np.stack([np.zeros((2, 32, 32, 32), np.float32)]))).shape == (1, 2)
