"""Alignment collapse watch (pretrain/monitor.py) and the EMA alignment target (``align_target="ema"``)."""

from __future__ import annotations

import pytest
import torch
from pretrain_helpers import DATA, RandomCrops, tiny_options

import mim_nnunet
from mim_nnunet.checkpoint import load_checkpoint
from mim_nnunet.plots import plot_progress
from mim_nnunet.pretrain.distributed import DistInfo
from mim_nnunet.pretrain.monitor import collapse_signal
from mim_nnunet.pretrain.run import read_metrics, run_pretraining

MONITORS = {"collapse_cos12", "collapse_std12", "collapse_cos23", "collapse_std23"}


def test_collapse_signal_tells_spread_from_collapsed_outputs():
    g = torch.Generator().manual_seed(0)
    child, parent = torch.randn(32, 48, generator=g), torch.randn(32, 48, generator=g)
    crop = torch.arange(32) // 16  # two crops
    cos, std = collapse_signal(child, parent, crop)
    assert abs(float(cos)) < 0.1 and 0.8 < float(std) < 1.2
    one = torch.randn(1, 48, generator=g)
    cos, std = collapse_signal(one.expand(32, -1) + 1e-4 * child, one.expand(32, -1) + 1e-4 * parent, crop)
    assert float(cos) > 0.99 and float(std) < 0.01
    # one crop in the batch: the non-matching pairs stand in for unrelated ones
    cos, _ = collapse_signal(child, child, torch.zeros(32, dtype=torch.long))
    assert abs(float(cos)) < 0.1


def _train_heads_on_unrelated_inputs(align_target: str, align_ema: float, steps: int = 40):
    """Only the alignment heads, on child/parent features that are independent noise: nothing to align."""
    torch.manual_seed(0)
    model = mim_nnunet.build_pretraining_model(
        "tiny", levels=2, align_target=align_target, align_ema=align_ema
    )
    opt = torch.optim.AdamW(model.align_heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        loss, monitors = model._align(
            "12", torch.randn(16, 48, generator=g), torch.randn(16, 48, generator=g), torch.arange(16)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_align_targets()
        history.append(
            (
                float(loss.detach()),
                float(monitors["collapse_cos12"]),
                float(monitors["collapse_std12"]),
            )
        )
    return history


def test_online_alignment_collapses_on_unrelated_inputs_and_a_frozen_target_does_not():
    """The synthetic check of issue 10: with nothing to align, the paper's two trained heads still drive the loss
    down by mapping everything to one direction; the signal shows it. A stop-gradient target that the loss cannot
    move (EMA momentum 1: frozen) keeps its spread, and the loss stays high."""
    online = _train_heads_on_unrelated_inputs("online", 0.99)
    assert online[0][0] > 1.8 and online[-1][0] < 0.6  # the loss "improves" ...
    assert online[-1][1] > 0.7 and online[-1][2] < 0.5 * online[0][2]  # ... by collapsing
    frozen = _train_heads_on_unrelated_inputs("ema", 1.0)
    assert frozen[-1][0] > 1.0
    assert frozen[-1][2] == pytest.approx(frozen[0][2], rel=0.15)
    ema = _train_heads_on_unrelated_inputs("ema", 0.99)
    assert ema[-1][2] > online[-1][2] + 0.2  # slower, but not immune: on pure noise BYOL drifts as well


def test_model_reports_the_signal_without_changing_the_loss():
    torch.manual_seed(1)
    model = mim_nnunet.build_pretraining_model("tiny")
    out = model(torch.rand(2, 1, 64, 64, 64), generator=torch.Generator().manual_seed(1))
    assert set(out.monitors) == MONITORS
    assert all(not v.requires_grad and torch.isfinite(v) for v in out.monitors.values())
    assert set(out.losses) == {"rec1", "rec2", "rec3", "align12", "align23"}
    mae = mim_nnunet.build_pretraining_model("tiny", levels=1)
    assert mae(torch.rand(1, 1, 64, 64, 64)).monitors == {}


def test_ema_target_trains_every_trainable_parameter_and_not_the_target():
    """DDP with find_unused_parameters=False needs a gradient for every trainable parameter; the target has none."""
    torch.manual_seed(2)
    model = mim_nnunet.build_pretraining_model("tiny", align_target="ema", align_ema=0.9)
    out = model(torch.rand(2, 1, 64, 64, 64), generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    targets = {n for n, _ in model.named_parameters() if n.startswith("align_targets.")}
    assert len(targets) == 8  # two heads of two layers, weight + bias
    for name, p in model.named_parameters():
        if name in targets:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = {n: p.detach().clone() for n, p in model.align_targets.named_parameters()}
    heads = dict(model.align_heads.named_parameters())
    with torch.no_grad():
        for p in model.align_heads.parameters():
            p.add_(1.0)
    model.update_align_targets()
    for n, p in model.align_targets.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * heads[n])


@pytest.mark.slow
def test_ema_target_is_checkpointed_and_resumed_exactly(tmp_path):
    """The EMA weights are in the checkpoint, so resume continues them: 4 steps straight == 2 + resume + 2."""
    opts = dict(max_steps=4, warmup_steps=1, align_target="ema", align_ema=0.5)
    run_pretraining(tmp_path / "straight", tiny_options(**opts), RandomCrops(), DATA, DistInfo())
    run_pretraining(tmp_path / "split", tiny_options(**opts, stop_after=2), RandomCrops(), DATA, DistInfo())
    run_pretraining(tmp_path / "split", tiny_options(**opts), RandomCrops(), DATA, DistInfo(), resume=True)
    wa, meta = load_checkpoint(tmp_path / "straight" / "checkpoint_final.safetensors")
    wb, _ = load_checkpoint(tmp_path / "split" / "checkpoint_final.safetensors")
    assert meta.config["align_target"] == "ema"
    init = mim_nnunet.build_pretraining_model("tiny", align_target="ema").state_dict()
    names = [n for n in wa if n.startswith("align_targets.")]
    assert len(names) == 8
    assert any(not torch.equal(wa[n], init[n]) for n in names)  # the target moved
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-5, atol=1e-6, msg=n)
    records = read_metrics(tmp_path / "straight")
    assert all(MONITORS <= set(r) for r in records)


def test_progress_plot_gets_panels_for_the_collapse_watch_and_the_probe(tmp_path):
    base = [{"step": s, "loss": 3.0, "rec1": 1.0, "align12": 1.0, "lr": 1e-3} for s in range(1, 5)]
    plot_progress(base, tmp_path / "plain.png")
    watched = [r | {"collapse_cos12": 0.1 * r["step"], "collapse_std12": 0.5} for r in base]
    watched[0]["probe_dice"] = watched[-1]["probe_dice"] = 0.4
    plot_progress(watched, tmp_path / "watched.png")
    from PIL import Image

    plain, more = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "watched.png")
    assert more.size[1] == plain.size[1] * 3 // 2  # a third row of panels: collapse watch and probe
