"""Layer-wise LR decay groups and the warm-up + cosine schedule that honours them."""

from __future__ import annotations

import math

import pytest
import torch

from mim_nnunet import make_config
from mim_nnunet.model.segmentation import MiMSegmentationNetwork
from mim_nnunet.nnunet.optim import WarmupCosineLR, encoder_layer_id, param_groups_layer_decay


@pytest.fixture
def net():
    c = make_config("tiny")
    return MiMSegmentationNetwork(
        1, 3, (32, 32, 32), dims=c.dims, conv_depths=c.conv_depths, depth=c.depth, num_heads=c.num_heads
    )


def test_layer_ids_follow_forward_order():
    cd, depth = (1, 1, 1), 2
    ids = [
        encoder_layer_id(n, cd, depth)
        for n in (
            "downsamples.0.0.weight",
            "stages.0.0.dw.weight",
            "downsamples.1.0.weight",
            "stages.1.0.dw.weight",
            "stages.2.0.pw1.bias",
            "token_proj.weight",
            "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc1.weight",
            "norm.weight",
        )
    ]
    assert ids == [0, 1, 2, 2, 3, 4, 4, 5, 6]


def test_groups_cover_every_parameter_once_with_decayed_scales(net):
    groups = param_groups_layer_decay(net, 1e-5, 0.5, (1, 1, 1), 2)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(net.parameters())) == len({id(p) for p in params})
    assert groups[0]["lr_scale"] == 1.0  # nnU-Net logs group 0's lr
    by_name = {}
    for g in groups:
        for p in g["params"]:
            by_name[id(p)] = g
    stem = by_name[id(net.encoder.downsamples[0][0].weight)]
    assert stem["lr_scale"] == 0.5**6 and stem["weight_decay"] == 1e-5
    assert by_name[id(net.encoder.downsamples[0][0].bias)]["weight_decay"] == 0.0
    assert by_name[id(net.decoder.seg_layers[0].weight)]["lr_scale"] == 1.0


def test_scheduler_writes_scaled_lr_into_every_group(net):
    groups = param_groups_layer_decay(net, 1e-5, 0.5, (1, 1, 1), 2)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = WarmupCosineLR(opt, 1e-3, total_epochs=100, warmup_epochs=10)
    for epoch, factor in ((5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0)):
        sched.step(epoch)
        for g in opt.param_groups:
            assert math.isclose(g["lr"], 1e-3 * factor * g["lr_scale"], abs_tol=1e-12)
    sched.step(0)
    assert 0 < opt.param_groups[0]["lr"] < 1e-5  # the first step moves, barely


def test_encoder_groups_scaled_decoder_groups_kept(net):
    from mim_nnunet.nnunet.optim import scale_encoder_groups

    groups = param_groups_layer_decay(net, 1e-5, 0.75, (1, 1, 1), 2)
    before = {id(g): g["lr_scale"] for g in groups}
    scale_encoder_groups(groups, 0.1)
    top = max(g["layer_id"] for g in groups)
    for g in groups:
        want = before[id(g)] * (0.1 if g["layer_id"] < top else 1.0)
        assert g["lr_scale"] == pytest.approx(want)
    dec = next(g for g in groups if any(p is net.decoder.seg_layers[0].weight for p in g["params"]))
    stem = next(g for g in groups if any(p is net.encoder.downsamples[0][0].weight for p in g["params"]))
    assert dec["lr_scale"] == 1.0 and stem["lr_scale"] == pytest.approx(0.1 * 0.75**6)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    WarmupCosineLR(opt, 1e-2, total_epochs=10, warmup_epochs=0).step(0.0)
    assert stem["lr"] == pytest.approx(1e-2 * 0.1 * 0.75**6) and dec["lr"] == pytest.approx(1e-2)
