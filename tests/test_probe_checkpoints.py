"""benchmarks/probe_checkpoints.py (issue 10, point 5): frozen-encoder probe of checkpoints against random inits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_nnunet_weights import make_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_checkpoints.py"


def _script(name: str = "probe_checkpoints"):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probes_checkpoints_and_random_inits_on_the_same_voxels(phantom_dataset, tmp_path):
    ckpt = tmp_path / "a.safetensors"
    make_checkpoint(ckpt, seed=3)
    out = tmp_path / "probe.json"
    argv = ["--dataset", str(phantom_dataset), "--cases", "1", "--random", "2", "--probe-seeds", "0", "--out", str(out),
            f"A={ckpt}", f"B={ckpt}"]  # fmt: skip
    assert _script().main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["A", "B", "random init (seed 0)", "random init (seed 1)"]
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["probe_dice"]) == 1 for r in rows)
    # the same weights on the same voxels give the same Dice; other weights another one
    assert rows[0]["probe_dice"] == rows[1]["probe_dice"]
    assert rows[2]["probe_dice"] != rows[3]["probe_dice"]


def test_refuses_a_missing_checkpoint_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--dataset", str(tmp_path), f"A={tmp_path / 'nope.safetensors'}"])
    assert e.value.code == 2 and "nope.safetensors: no such checkpoint" in capsys.readouterr().err


def test_encoder_drift_is_zero_for_the_same_weights_and_grows_with_change(tmp_path):
    import torch

    mod = _script("encoder_drift")
    m, _ = make_checkpoint(tmp_path / "a.safetensors")
    state = m.state_dict()
    same = mod.drift(state, state, "encoder.")
    assert same and all(v == 0.0 for v in same.values())
    moved = {k: (v * 1.5 if k.startswith("encoder.blocks.0.") else v) for k, v in state.items()}
    d = mod.drift(state, moved, "encoder.")
    assert d["blocks.0"] == pytest.approx(0.5) and d["blocks.1"] == 0.0
    with pytest.raises(ValueError, match="no encoder weight"):
        mod.drift(state, {"decoder.x": torch.zeros(2, 2)}, "encoder.")


def test_noise_floor_is_zero_without_noise_and_near_one_for_pure_noise():
    import torch

    mod = _script("phantom_information")
    from mim_nnunet import build_pretraining_model

    model = build_pretraining_model("tiny")
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, 64)] * 3, indexing="ij")
    clean = (0.5 + 0.3 * torch.sin(6 * z) * torch.cos(5 * y) + 0.1 * x)[None, None]
    floors = mod.level_floors(model, clean, clean, seed=0)
    assert len(floors) == model.config.levels and all(s == 0.0 and n > 0 for s, n in floors)
    flat = torch.full_like(clean, 0.5)
    noisy = flat + 0.05 * torch.randn(clean.shape, generator=g)
    for s, n in mod.level_floors(model, noisy, flat, seed=0):
        assert 0.9 < s / n < 1.1  # a token of pure noise: nothing is predictable (about 1)
