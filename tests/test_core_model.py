"""Core method tests (issue 2): masking geometry, masked-conv isolation, gradients, sizes, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mim_nnunet as mim
from mim_nnunet.losses import patchify, unpatchify
from mim_nnunet.masking import octant_tokens


def smooth_volume(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blobs on a background: structured enough that norm-pix targets are learnable, random enough to test."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    out = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        for _ in range(6):
            c = torch.rand(3, generator=g) * 1.6 - 0.8
            r = 0.15 + 0.3 * torch.rand(1, generator=g)
            out[i, 0] += torch.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / r**2)
    return out / out.amax() + 0.02 * torch.rand(out.shape, generator=g)


@pytest.fixture(scope="module")
def model64():
    """Tiny widths at S = 64: a 4^3 token grid, so octants hold 8 tokens and the geometry is non-trivial."""
    torch.manual_seed(0)
    return mim.build_pretraining_model("tiny", input_size=64)


def test_level_shapes_and_api(model64):
    crops = smooth_volume(2, 128)
    out = model64(crops, generator=torch.Generator().manual_seed(1))
    s, length = 64, 64
    assert model64.input_size == s and model64.crop_size == 128
    assert [lv.inputs.shape[0] for lv in out.levels] == [2, 8, 32]
    for lv in out.levels:
        assert lv.inputs.shape[1:] == (1, s, s, s)
        assert lv.masks.shape == (lv.inputs.shape[0], length)
        assert lv.predictions.shape == (lv.inputs.shape[0], length, 16**3)
    assert out.levels[0].parents is None
    assert out.levels[1].parents.shape == (8,)
    assert out.levels[2].parents.shape == (32, 2)
    assert set(out.losses) == {"rec1", "rec2", "rec3", "align12", "align23"}
    expected = sum(out.losses[f"rec{i}"] for i in (1, 2, 3)) + 0.1 * (out.losses["align12"] + out.losses["align23"])
    assert torch.allclose(out.loss, expected)
    # mask ratios: 4 of 8 octants, 60 % and 50 % of tokens
    assert out.levels[0].masks.sum(1).tolist() == [32, 32]
    assert (out.levels[1].masks.sum(1) == length - int(length * 0.4)).all()
    assert (out.levels[2].masks.sum(1) == length // 2).all()


def test_level1_masks_are_true_octants(model64):
    out = model64(smooth_volume(3, 128), generator=torch.Generator().manual_seed(2))
    table = octant_tokens(4)
    for mask in out.levels[0].masks:
        per_octant = mask[table].sum(1)  # masked tokens per octant: all or nothing
        assert set(per_octant.tolist()) <= {0.0, 8.0}
        assert int((per_octant == 8).sum()) == 4


def test_level2_inputs_are_native_octants_of_masked_level1_units(model64):
    crops = smooth_volume(2, 128, seed=3)
    out = model64(crops, generator=torch.Generator().manual_seed(3))
    lv1, lv2 = out.levels[0], out.levels[1]
    table = octant_tokens(4)
    for m in range(lv2.inputs.shape[0]):
        n, o = int(lv2.parent_volume[m]), int(lv2.parents[m])
        assert m // 4 == n
        assert lv1.masks[n, table[o]].eq(1).all(), "level-2 volume cut from a visible octant"
        od, oh, ow = o // 4, (o // 2) % 2, o % 2
        native = crops[n, :, od * 64:(od + 1) * 64, oh * 64:(oh + 1) * 64, ow * 64:(ow + 1) * 64]
        assert torch.equal(lv2.inputs[m], native)
    # level 1 is the crop down-sampled x0.5 (trilinear at half size = 2x2x2 mean)
    assert torch.allclose(lv1.inputs, F.avg_pool3d(crops, 2), atol=1e-6)


def test_level3_inputs_are_upsampled_patches_of_masked_level2_tokens(model64):
    out = model64(smooth_volume(1, 128, seed=4), generator=torch.Generator().manual_seed(4))
    lv2, lv3 = out.levels[1], out.levels[2]
    for m in range(lv3.inputs.shape[0]):
        v, t = (int(x) for x in lv3.parents[m])
        assert int(lv3.parent_volume[m]) == v
        assert lv2.masks[v, t] == 1, "level-3 volume cut from a visible level-2 token"
        td, th, tw = t // 16, (t // 4) % 4, t % 4
        patch = lv2.inputs[v:v + 1, :, td * 16:(td + 1) * 16, th * 16:(th + 1) * 16, tw * 16:(tw + 1) * 16]
        expected = F.interpolate(patch, size=(64, 64, 64), mode="trilinear", align_corners=False)
        assert torch.equal(lv3.inputs[m:m + 1], expected)
    # four distinct children per level-2 volume
    for v in range(lv2.inputs.shape[0]):
        assert len(set(lv3.parents[lv3.parents[:, 0] == v, 1].tolist())) == 4


def test_masked_convolution_isolates_visible_tokens(model64):
    torch.manual_seed(5)
    x = smooth_volume(2, 64, seed=5)
    mask = torch.zeros(2, 64)
    mask[:, torch.randperm(64)[:38]] = 1.0
    vox = unpatchify(mask[..., None].expand(-1, -1, 16**3), (4, 4, 4))  # 1 inside masked tokens
    x2 = x + vox * torch.randn_like(x) * 5.0
    model64.eval()
    with torch.no_grad():
        stages_a, tok_a = model64.encoder.forward_conv(x, mask)
        stages_b, tok_b = model64.encoder.forward_conv(x2, mask)
        z_a, ids_a, _ = model64.forward_encoder(x, mask)
        z_b, ids_b, _ = model64.forward_encoder(x2, mask)
    visible = mask == 0
    assert torch.allclose(tok_a[visible], tok_b[visible], atol=1e-5)
    assert not torch.allclose(tok_a[~visible], tok_b[~visible], atol=1e-3), "perturbation did not reach masked tokens"
    for i, (sa, sb) in enumerate(zip(stages_a, stages_b)):
        vis = F.interpolate((1 - vox), size=sa.shape[2:], mode="nearest").bool().expand_as(sa)
        assert torch.allclose(sa[vis], sb[vis], atol=1e-5), f"stage {i + 1} leaks masked voxels"
    assert torch.equal(ids_a, ids_b)
    assert torch.allclose(z_a, z_b, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_every_parameter_gets_a_finite_gradient(levels):
    torch.manual_seed(6)
    model = mim.build_pretraining_model("tiny", levels=levels, level1_masking="octant")
    out = model(smooth_volume(2, 64), generator=torch.Generator().manual_seed(6))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    if levels == 1:
        assert set(out.losses) == {"rec1"} and len(model.align_heads) == 0


def test_batched_equals_level_by_level():
    torch.manual_seed(7)
    batched = mim.build_pretraining_model("tiny", input_size=64)
    sequential = mim.build_pretraining_model("tiny", input_size=64, batch_levels=False)
    sequential.load_state_dict(batched.state_dict())
    crops = smooth_volume(2, 128, seed=7)
    a = batched(crops, generator=torch.Generator().manual_seed(7))
    b = sequential(crops, generator=torch.Generator().manual_seed(7))
    for k in a.losses:
        assert torch.allclose(a.losses[k], b.losses[k], rtol=1e-4, atol=1e-5), k
    for la, lb in zip(a.levels, b.levels):
        assert torch.allclose(la.predictions, lb.predictions, rtol=1e-4, atol=1e-4)


def test_determinism_same_seed_same_masks_and_loss(model64):
    crops = smooth_volume(2, 128, seed=8)
    a = model64(crops, generator=torch.Generator().manual_seed(8))
    b = model64(crops, generator=torch.Generator().manual_seed(8))
    c = model64(crops, generator=torch.Generator().manual_seed(9))
    for la, lb in zip(a.levels, b.levels):
        assert torch.equal(la.masks, lb.masks) and torch.equal(la.inputs, lb.inputs)
    assert torch.equal(a.loss, b.loss)
    assert not all(torch.equal(la.masks, lc.masks) for la, lc in zip(a.levels, c.levels))


def test_base_preset_parameter_counts():
    model = mim.build_pretraining_model("base")
    enc = sum(p.numel() for p in model.encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert math.isclose(enc, 21.5e6, rel_tol=0.02), enc
    assert math.isclose(total, 71e6, rel_tol=0.03), total
    assert model.input_size == 96 and model.crop_size == 192
    fusion = sum(p.numel() for p in model.fusion.parameters())
    assert math.isclose(fusion, 12.4e6, rel_tol=0.02), fusion
    assert sum(p.numel() for p in mim.build_encoder("base").parameters()) == enc


def test_patchify_roundtrip():
    x = torch.randn(2, 1, 32, 48, 64)
    tokens = patchify(x)
    assert tokens.shape == (2, 2 * 3 * 4, 16**3)
    assert torch.equal(unpatchify(tokens, (2, 3, 4)), x)
    # token 1 is the second along the last axis (C order)
    assert torch.equal(tokens[0, 1], x[0, 0, :16, :16, 16:32].reshape(-1))


def test_config_validation_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        mim.build_pretraining_model("tiny", input_size=48)
    with pytest.raises(ValueError, match="unknown preset"):
        mim.build_pretraining_model("huge")
    with pytest.raises(ValueError, match="children_per_volume"):
        mim.build_pretraining_model("tiny", children_per_volume=7)


@pytest.mark.slow
def test_overfits_one_sample():
    torch.manual_seed(10)
    model = mim.build_pretraining_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    crops = smooth_volume(1, 64, seed=10)
    losses = []
    late = float("inf")
    for step in range(250):  # at most 250 steps; stops once the last 20 losses average half the first
        out = model(crops, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if len(losses) >= 20:
            late = sum(losses[-20:]) / 20
            if late <= 0.5 * losses[0]:
                break
    assert late <= 0.5 * losses[0], (losses[0], late, len(losses))


def test_fast_cpu_depthwise_conv_matches_autograd():
    from mim_nnunet.model.layers import DepthwiseConv3d

    torch.manual_seed(11)
    conv = DepthwiseConv3d(3, 5).double()
    x = torch.randn(2, 3, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 7, 8, dtype=torch.float64)
    (conv(x) * g).sum().backward()
    ours = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    conv.zero_grad()
    ref = F.conv3d(x, conv.weight, conv.bias, padding=2, groups=3)
    assert torch.allclose(conv(x), ref)
    (ref * g).sum().backward()
    for a, b in zip(ours, (x.grad, conv.weight.grad, conv.bias.grad)):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()


@pytest.mark.parametrize("packed", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(packed):
    torch.manual_seed(12)
    plain = mim.build_pretraining_model("tiny", packed=packed)
    ckpt = mim.build_pretraining_model("tiny", packed=packed, grad_checkpointing=True, checkpoint_chunk=3)
    ckpt.load_state_dict(plain.state_dict())
    crops = smooth_volume(2, 64, seed=12)
    for model in (plain, ckpt):
        model(crops, generator=torch.Generator().manual_seed(12)).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_morton_layout_groups_2x2x2_blocks_in_kernel_order():
    from mim_nnunet.model.packed import morton_kernel_order, morton_offsets

    for p in (2, 4, 8, 16):
        off = morton_offsets(p)
        assert off.shape == (p**3, 3) and len({tuple(o) for o in off.tolist()}) == p**3  # a permutation
        blocks = off.view(-1, 8, 3)
        # 8 consecutive rows share their parent voxel and enumerate its children in C order (dz*4 + dy*2 + dx)
        assert (blocks // 2 == blocks[:, :1] // 2).all()
        digit = (blocks % 2) @ torch.tensor([4, 2, 1])
        assert (digit == torch.arange(8)).all()
        assert sorted(morton_kernel_order(p).tolist()) == list(range(p**3))


@pytest.mark.parametrize("levels,level1", [(3, "octant"), (1, "token")])
def test_packed_execution_equals_dense(levels, level1):
    """Visible-voxels-only execution (the default) == dense masked convolution: losses, predictions, gradients."""
    torch.manual_seed(13)
    kw = dict(input_size=64, levels=levels, level1_masking=level1, children_per_volume=2)  # 1 + 4 + 8 volumes a crop
    dense = mim.build_pretraining_model("tiny", packed=False, **kw).double()
    packed = mim.build_pretraining_model("tiny", **kw).double()
    packed.load_state_dict(dense.state_dict())
    assert packed.config.packed and not dense.config.packed
    crops = smooth_volume(1 if levels > 1 else 3, 128, seed=13).double()
    a = dense(crops, generator=torch.Generator().manual_seed(13))
    b = packed(crops, generator=torch.Generator().manual_seed(13))
    for k in a.losses:
        assert torch.allclose(a.losses[k], b.losses[k], rtol=1e-10, atol=1e-12), k
    for la, lb in zip(a.levels, b.levels):
        assert torch.allclose(la.predictions, lb.predictions, rtol=1e-10, atol=1e-10)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), (_, pb) in zip(dense.named_parameters(), packed.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-8, atol=1e-12), name


def test_packed_encoder_handles_unequal_visible_counts(model64):
    """Volumes with different numbers of visible tokens: packed (one attention call per run, no padding) equals
    dense (padding + key mask) at every valid position."""
    torch.manual_seed(14)
    x = smooth_volume(4, 64, seed=14)
    mask = torch.zeros(4, 64)
    for i, n in enumerate((10, 10, 37, 63)):  # runs: 2 volumes of 54 visible tokens, then 27, then 1
        mask[i, torch.randperm(64)[:n]] = 1.0
    dense = mim.build_pretraining_model("tiny", input_size=64, packed=False)
    dense.load_state_dict(model64.state_dict())
    model64.eval()
    dense.eval()
    with torch.no_grad():
        z_p, ids_p, valid_p = model64.forward_encoder(x, mask)
        z_d, ids_d, valid_d = dense.forward_encoder(x, mask)
    assert torch.equal(ids_p, ids_d) and torch.equal(valid_p, valid_d)
    assert valid_p.sum(1).tolist() == [54, 54, 27, 1]
    assert torch.allclose(z_p[valid_p], z_d[valid_d], atol=1e-5)
    assert (z_p[~valid_p] == 0).all()


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_autocast_runs_and_stays_close(packed):
    """Mixed precision (the pre-training default on GPUs; here CPU bf16 autocast) through both executions."""
    torch.manual_seed(15)
    model = mim.build_pretraining_model("tiny", packed=packed)
    crops = smooth_volume(1, 64, seed=15)
    with torch.no_grad():
        ref = model(crops, generator=torch.Generator().manual_seed(15)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(crops, generator=torch.Generator().manual_seed(15))
    out.loss.backward()
    loss = out.loss.detach()
    assert torch.isfinite(loss) and abs(float(loss) - float(ref)) < 0.05 * float(ref)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
