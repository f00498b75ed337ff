"""The checkpoint format (product.md): round trip, complete metadata, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import stat
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mim_nnunet
from mim_nnunet import checkpoint as ckpt
from mim_nnunet.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    check_state_dict,
    load_checkpoint,
    load_resume_state,
    read_metadata,
    save_checkpoint,
    save_resume_state,
)

# Every field product.md lists for the metadata, by its name in CheckpointMetadata.
CONTRACT = {
    "format_version", "preset", "config", "token_size", "input_size", "crop_size", "spacing", "intensity_window",
    "axis_convention", "corpus", "encoder_prefix", "step", "epoch", "code_version", "weights_sha256",
}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mim_nnunet.build_pretraining_model("tiny")


def _metadata(model) -> CheckpointMetadata:
    return CheckpointMetadata(
        preset="tiny", config=model.config.to_dict(), spacing=[1.5, 1.5, 1.5], intensity_window=[-1000.0, 1000.0],
        input_size=model.input_size, crop_size=model.crop_size, corpus={"num_cases": 3}, step=7, epoch=2,
        code_version=mim_nnunet.__version__,
    )  # fmt: skip


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model.state_dict(), _metadata(model))
    return path


def test_round_trip_weights_equal_and_metadata_complete(saved, model):
    state, meta = load_checkpoint(saved)
    expected = model.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert CONTRACT <= {f.name for f in fields(CheckpointMetadata)}
    raw = json.loads(meta.to_json())
    assert CONTRACT <= set(raw)
    assert meta.preset == "tiny" and meta.step == 7 and meta.epoch == 2
    assert meta.config == json.loads(json.dumps(model.config.to_dict()))
    assert mim_nnunet.MiMConfig.from_dict(meta.config) == model.config  # the architecture can be rebuilt
    assert meta.format_version == ckpt.FORMAT_VERSION and len(meta.weights_sha256) == 64
    assert meta.spacing == [1.5, 1.5, 1.5] and meta.intensity_window == [-1000.0, 1000.0]
    assert meta.code_version == mim_nnunet.__version__ and meta.encoder_prefix == "encoder."
    assert read_metadata(saved) == meta  # header-only read agrees
    assert any(k.startswith(meta.encoder_prefix) for k in state)


def test_tampered_weights_rejected(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*sha256.*does not match"):
        load_checkpoint(saved)


def test_truncated_file_rejected(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*(truncated|not a readable)"):
        load_checkpoint(saved)
    saved.write_bytes(data[:5])  # not even a header
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        load_checkpoint(saved)


def test_foreign_or_incomplete_files_rejected(tmp_path, model):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a MiM checkpoint"):
        read_metadata(plain)
    partial = tmp_path / "partial.safetensors"
    save_file(
        {"w": torch.zeros(2)}, str(partial), metadata={ckpt.METADATA_KEY: json.dumps({"preset": "tiny"})}
    )
    with pytest.raises(CheckpointError, match=r"lacks the fields.*config"):
        read_metadata(partial)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_metadata(tmp_path / "missing.safetensors")


def test_future_format_version_rejected(tmp_path, model):
    path = tmp_path / "future.safetensors"
    md = _metadata(model)
    save_file({"w": torch.zeros(1)}, str(path), metadata={ckpt.METADATA_KEY: md.to_json().replace(
        f'"format_version": {ckpt.FORMAT_VERSION}', '"format_version": 99')})  # fmt: skip
    with pytest.raises(CheckpointError, match="format version 99"):
        read_metadata(path)


def test_failed_write_keeps_previous_checkpoint(saved, model, monkeypatch):
    before = saved.read_bytes()

    def broken_save(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, model.state_dict(), _metadata(model))
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary file left behind
    load_checkpoint(saved)


def test_state_dict_mismatch_names_keys_and_shapes(model):
    expected = model.state_dict()
    loaded = dict(expected)
    loaded.pop("encoder.norm.weight")
    loaded["extra.weight"] = torch.zeros(1)
    loaded["encoder.token_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        check_state_dict("x.safetensors", loaded, expected)
    msg = str(e.value)
    assert (
        "encoder.norm.weight" in msg
        and "extra.weight" in msg
        and "encoder.token_proj.weight: checkpoint (3, 3)" in msg
    )


def test_resume_state_round_trip_and_truncation(tmp_path, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(1, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0)).loss.backward()
    opt.step()
    path = tmp_path / "resume_state.pt"
    save_resume_state(path, {"step": 3, "optimizer": opt.state_dict(), "data": {"seed": 0}})
    state = load_resume_state(path)
    assert state["step"] == 3
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], exp_avg)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="resume_state.pt.*truncated or corrupted"):
        load_resume_state(path)
    with pytest.raises(CheckpointError, match="no resume state"):
        load_resume_state(tmp_path / "nothing.pt")


def _rewrite_metadata(path, edit) -> None:
    """Change the JSON metadata of a checkpoint as a hand edit would: same tensors, edited header."""
    from safetensors.torch import load_file

    with ckpt.safe_open(str(path), framework="pt") as f:
        raw = json.loads(f.metadata()[ckpt.METADATA_KEY])
    edit(raw)
    save_file(load_file(str(path)), str(path), metadata={ckpt.METADATA_KEY: json.dumps(raw)})


@pytest.mark.parametrize(
    "field, value", [("spacing", [2.0, 2.0, 2.0]), ("intensity_window", [-500.0, 500.0]), ("preset", "small")]
)
def test_edited_metadata_rejected(saved, field, value):
    _rewrite_metadata(saved, lambda raw: raw.update({field: value}))
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors: metadata sha256 .* does not match"):
        read_metadata(saved)
    with pytest.raises(CheckpointError, match="metadata sha256"):
        load_checkpoint(saved)


def test_edited_architecture_rejected(saved):
    _rewrite_metadata(saved, lambda raw: raw["config"].update(depth=raw["config"].get("depth", 0) + 1))
    with pytest.raises(CheckpointError, match="metadata sha256"):
        read_metadata(saved)


def test_dropping_the_metadata_digest_is_detected(saved):
    _rewrite_metadata(saved, lambda raw: raw.pop("metadata_sha256"))
    with pytest.raises(CheckpointError, match="lacks .*metadata_sha256"):
        read_metadata(saved)


def test_format_1_files_without_metadata_digest_stay_readable(tmp_path, model):
    """Checkpoints written before the metadata was hashed (format 1) load, weights still verified."""
    path = tmp_path / "old.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    raw = json.loads(_metadata(model).to_json())
    raw.pop("metadata_sha256", None)
    raw.update(format_version=1, weights_sha256=ckpt.weights_sha256(state))
    save_file(state, str(path), metadata={ckpt.METADATA_KEY: json.dumps(raw)})
    loaded, meta = load_checkpoint(path)
    assert meta.format_version == 1 and meta.spacing == [1.5, 1.5, 1.5]
    assert torch.equal(loaded["encoder.norm.weight"], state["encoder.norm.weight"])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_honour_the_umask(tmp_path, model, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.safetensors", model.state_dict(), _metadata(model))
        save_resume_state(tmp_path / "r.pt", {"step": 1})
    finally:
        os.umask(old)
    for name in ("c.safetensors", "r.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", b"\x80\x04\x95", pickle.dumps({"step": 1}) + b"junk", b""],
    ids=["text", "pickle-header", "trailing-junk", "empty"],
)
def test_unreadable_resume_state_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "resume_state.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"resume_state\.pt: resume state is truncated or corrupted"):
        load_resume_state(path)


def test_resume_state_with_foreign_objects_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "resume_state.pt"
    torch.save({"step": 1, "thing": Path("x")}, path)  # not loadable with weights_only
    with pytest.raises(CheckpointError, match=r"resume_state\.pt: resume state"):
        load_resume_state(path)
