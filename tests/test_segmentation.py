"""The fine-tuning segmentation network (mim_method.md §6): shapes, deep supervision, encoder parameter names."""

from __future__ import annotations

import pytest
import torch

from mim_nnunet import build_pretraining_model, make_config
from mim_nnunet.model.segmentation import MiMSegmentationNetwork


def tiny_net(patch, num_classes=3, deep_supervision=True, in_ch=1):
    c = make_config("tiny")
    return MiMSegmentationNetwork(
        in_ch,
        num_classes,
        patch,
        dims=c.dims,
        conv_depths=c.conv_depths,
        depth=c.depth,
        num_heads=c.num_heads,
        deep_supervision=deep_supervision,
    )


@pytest.mark.parametrize("patch", [(32, 32, 32), (16, 48, 32), (64, 32, 16)])
def test_deep_supervision_outputs_full_resolution_first(patch):
    net = tiny_net(patch)
    out = net(torch.randn(2, 1, *patch))
    assert [tuple(o.shape) for o in out] == [(2, 3, *(p // s for p in patch)) for s in (1, 2, 4, 8)]


def test_without_deep_supervision_one_tensor_and_toggle():
    net = tiny_net((32, 48, 32), deep_supervision=False)
    x = torch.randn(1, 1, 32, 48, 32)
    assert net(x).shape == (1, 3, 32, 48, 32)
    net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
    assert len(net(x)) == 4


def test_encoder_parameter_names_equal_pretraining_encoder():
    seg = tiny_net((32, 32, 32))
    pre = build_pretraining_model("tiny")
    pre_keys = {k for k in pre.state_dict() if k.startswith("encoder.")}
    seg_keys = {k for k in seg.state_dict() if k.startswith("encoder.")}
    assert seg_keys == pre_keys


def test_every_parameter_gets_a_gradient():
    net = tiny_net((32, 32, 32))
    sum(o.float().mean() for o in net(torch.randn(2, 1, 32, 32, 32))).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_patch_not_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_net((32, 40, 32))


def test_feature_norm_per_map_normalises_every_map_without_the_final_norm():
    """Issue 9 point 7: "per_map" feeds the decoder the four maps LayerNormed over channels, no parameters,
    without the pre-training final norm; "final" (default) is the network as before."""
    torch.manual_seed(0)
    final = tiny_net((32, 32, 48))
    assert final.feature_norm == "final"
    c = make_config("tiny")
    per_map = MiMSegmentationNetwork(1, 3, (32, 32, 48), dims=c.dims, conv_depths=c.conv_depths, depth=c.depth,
                                     num_heads=c.num_heads, feature_norm="per_map")
    per_map.load_state_dict(final.state_dict())  # same parameters: the switch adds none
    seen = []
    per_map.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    x = torch.randn(2, 1, 32, 32, 48)
    out = per_map(x)
    for f in seen[0]:
        assert torch.allclose(f.mean(1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(f.var(1, unbiased=False), torch.ones(()), atol=1e-3)
    raw = per_map.encoder(x, final_norm=False)[3]
    assert not torch.allclose(raw, final.encoder(x)[3])  # the final norm really is skipped
    assert not torch.allclose(out[0], final(x)[0])
    sum(o.sum() for o in out).backward()
    assert per_map.encoder.norm.weight.grad is None and not per_map.encoder.norm.weight.requires_grad  # unused
    assert all(p.grad is not None for n, p in per_map.named_parameters() if not n.startswith("encoder.norm."))
    with pytest.raises(ValueError, match="feature_norm"):
        MiMSegmentationNetwork(1, 3, (32, 32, 32), dims=c.dims, conv_depths=c.conv_depths, depth=c.depth,
                               num_heads=c.num_heads, feature_norm="none")
