"""Loading a MiM checkpoint into the segmentation encoder: exact copy, the position table of the patch grid, clear errors."""

from __future__ import annotations

import pytest
import torch

from mim_nnunet import build_pretraining_model
from mim_nnunet.checkpoint import CheckpointError, CheckpointMetadata, save_checkpoint
from mim_nnunet.model.pos_embed import adapt_pos_embed, resize_pos_embed, sincos_pos_embed_3d
from mim_nnunet.model.segmentation import MiMSegmentationNetwork
from mim_nnunet.nnunet.planner import architecture_kwargs
from mim_nnunet.nnunet.weights import load_pretrained_encoder


def make_checkpoint(path, preset="tiny", seed=0):
    torch.manual_seed(seed)
    m = build_pretraining_model(preset)
    md = CheckpointMetadata(
        preset=preset,
        config=m.config.to_dict(),
        spacing=[1.5] * 3,
        intensity_window=[-1000, 1000],
        input_size=m.config.input_size,
        crop_size=2 * m.config.input_size,
    )
    sha = save_checkpoint(path, m.state_dict(), md)
    return m, sha


def seg_net(preset_model, patch, in_ch=1):
    kw = architecture_kwargs(preset_model.config, patch)
    return MiMSegmentationNetwork(in_ch, 4, **kw)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.safetensors"
    model, sha = make_checkpoint(path)
    return path, model, sha


def test_every_encoder_tensor_equals_the_checkpoint(ckpt):
    path, model, sha = ckpt
    net = seg_net(model, (48, 64, 32))  # token grid (3, 4, 2) vs pre-training (2, 2, 2)
    report = load_pretrained_encoder(net, path, sha, architecture_kwargs(model.config, (48, 64, 32)))
    src = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    got = net.encoder.state_dict()
    assert set(got) == set(src)
    for k, v in src.items():
        if k == "pos_embed":
            assert torch.equal(got[k], sincos_pos_embed_3d(v.shape[-1], (3, 4, 2))[None])
        else:
            assert torch.equal(got[k], v), k
    assert report.tensors == len(src) and report.pos_grid_to == (3, 4, 2) and report.pos_method == "recomputed"


def test_anisotropic_patch_gets_the_sincos_table_at_integer_positions(ckpt):
    """Issue 9: a 160 x 128 x 96 patch (token grid 10 x 8 x 6) must see the positions 0..9, 0..7, 0..5."""
    path, model, sha = ckpt
    patch = (160, 128, 96)
    net = seg_net(model, patch)
    report = load_pretrained_encoder(net, path, sha, architecture_kwargs(model.config, patch))
    dim = model.config.dims[3]
    want = sincos_pos_embed_3d(dim, (10, 8, 6))[None]
    assert report.pos_grid_from == (2, 2, 2) and report.pos_grid_to == (10, 8, 6)
    assert torch.equal(net.encoder.pos_embed, want)
    # The old trilinear stretch of the 2^3 table is far from it: the defect this guards against.
    stretched = resize_pos_embed(model.encoder.pos_embed, (2, 2, 2), (10, 8, 6))
    assert (stretched - want).abs().max() > 0.5
    # The buffer is what the forward pass adds: the unmasked encoder equals one built for that grid directly.
    ref = MiMSegmentationNetwork(1, 4, **architecture_kwargs(model.config, patch)).encoder
    ref.load_state_dict(net.encoder.state_dict())
    assert torch.equal(ref.position_embedding((10, 8, 6)), net.encoder.pos_embed)


def test_adapt_pos_embed_recomputes_sincos_and_resamples_other_tables(caplog):
    pe = sincos_pos_embed_3d(48, (2, 2, 2))[None]
    same, how = adapt_pos_embed(pe, (2, 2, 2), (2, 2, 2))
    assert how == "unchanged" and torch.equal(same, pe)
    table, how = adapt_pos_embed(pe + 1e-6, (2, 2, 2), (5, 3, 4))  # converted tables differ by ~1e-7
    assert how == "recomputed" and torch.equal(table, sincos_pos_embed_3d(48, (5, 3, 4))[None])
    learned = torch.randn(1, 8, 48)
    with caplog.at_level("WARNING"):
        table, how = adapt_pos_embed(learned, (2, 2, 2), (5, 3, 4))
    assert how == "resampled" and torch.equal(table, resize_pos_embed(learned, (2, 2, 2), (5, 3, 4)))
    assert "not the fixed sin-cos table" in caplog.text
    with pytest.raises(ValueError, match="grid"):
        adapt_pos_embed(pe, (2, 2, 3), (4, 4, 4))
    # the recomputed table keeps the stored table's dtype (and device: it replaces a buffer in place)
    table, how = adapt_pos_embed(pe.double(), (2, 2, 2), (3, 2, 2))
    assert how == "recomputed" and table.dtype == torch.float64


def test_same_grid_position_embedding_is_unchanged(ckpt):
    path, model, sha = ckpt
    net = seg_net(model, (32, 32, 32))
    load_pretrained_encoder(net, path, sha)
    assert torch.equal(net.encoder.pos_embed, model.encoder.pos_embed)


def test_resize_pos_embed_is_trilinear_and_keeps_constants():
    pe = sincos_pos_embed_3d(48, (2, 2, 2))[None]
    assert torch.equal(resize_pos_embed(pe, (2, 2, 2), (2, 2, 2)), pe)
    const = torch.ones(1, 8, 6)
    assert torch.allclose(resize_pos_embed(const, (2, 2, 2), (5, 3, 4)), torch.ones(1, 60, 6))
    with pytest.raises(ValueError, match="grid"):
        resize_pos_embed(pe, (2, 2, 3), (4, 4, 4))


def test_checkpoint_of_another_preset_fails_naming_the_mismatch(tmp_path):
    small, _ = make_checkpoint(tmp_path / "small.safetensors", preset="small")
    tiny = build_pretraining_model("tiny")
    net = seg_net(tiny, (32, 32, 32))
    with pytest.raises(CheckpointError, match=r"preset 'small'.*dims"):
        load_pretrained_encoder(
            net, tmp_path / "small.safetensors", None, architecture_kwargs(tiny.config, (32,) * 3)
        )
    # without the plans' kwargs the key/shape check still names what does not fit
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_pretrained_encoder(net, tmp_path / "small.safetensors")


def test_corrupted_checkpoint_fails_clearly(ckpt):
    path, model, sha = ckpt
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    net = seg_net(model, (32, 32, 32))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_pretrained_encoder(net, path, sha)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_pretrained_encoder(net, path, sha)


def test_planned_sha256_must_match(ckpt, tmp_path):
    path, model, sha = ckpt
    other = tmp_path / "other.safetensors"
    make_checkpoint(other, seed=1)
    net = seg_net(model, (32, 32, 32))
    with pytest.raises(CheckpointError, match="the plans were made with"):
        load_pretrained_encoder(net, other, sha)


def test_stem_repeated_for_multichannel_input(ckpt):
    path, model, sha = ckpt
    net = seg_net(model, (32, 32, 32), in_ch=2)
    report = load_pretrained_encoder(net, path, sha)
    w = model.state_dict()["encoder.downsamples.0.0.weight"]
    assert report.stem_repeated == 2
    assert torch.equal(net.encoder.downsamples[0][0].weight, w.repeat(1, 2, 1, 1, 1) / 2)
