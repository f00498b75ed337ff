"""The pre-training engine: optimizer groups, schedule, data order, resume equivalence, DDP, stopping."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import DATA, RandomCrops, tiny_options

import mim_nnunet
from mim_nnunet.checkpoint import load_checkpoint, load_resume_state
from mim_nnunet.pretrain.distributed import DistInfo, init_distributed, shutdown
from mim_nnunet.pretrain.optim import build_optimizer, lr_at, scaled_lr
from mim_nnunet.pretrain.run import read_metrics, run_pretraining
from mim_nnunet.pretrain.sampler import CropOrder

LOSSES = ("loss", "rec1", "rec2", "rec3", "align12", "align23")


def test_weight_decay_groups():
    model = mim_nnunet.build_pretraining_model("tiny")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.05
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert len(no_decay) + len(decay) == len(names)
    assert "decoder.mask_token" in no_decay
    assert all(
        n.endswith("bias") or "norm" in n or n.endswith(".1.weight") or "mask_token" in n for n in no_decay
    )
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.stages.0.0.dw.weight" in decay
    assert not any(n.endswith("bias") or "norm" in n for n in decay)


def test_lr_schedule():
    assert scaled_lr(1e-4, 128) == pytest.approx(5e-5)  # the paper's effective batch (mim_method.md §5)
    lrs = [lr_at(s, 1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # monotone cosine decay
    assert lr_at(12, 1.0, 4, 20) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(20, 1.0, 4, 20, min_lr=0.1) == pytest.approx(0.1)


def _stream(order: CropOrder, n: int) -> list[tuple[int, int]]:
    it = iter(order)
    return [next(it) for _ in range(n)]


def test_crop_order_is_deterministic_resumable_and_sharded():
    n, batch, acc, world = 7, 2, 2, 2
    full = [_stream(CropOrder(n, batch, acc, world, r, seed=3), 40) for r in range(world)]
    assert full[0] == _stream(CropOrder(n, batch, acc, world, 0, seed=3), 40)
    assert full[0] != _stream(CropOrder(n, batch, acc, world, 0, seed=4), 40)
    per_step = batch * acc
    for start in (1, 2, 5):  # a resumed stream continues the uninterrupted one exactly
        resumed = _stream(CropOrder(n, batch, acc, world, 1, seed=3, start_step=start), 40 - start * per_step)
        assert resumed == full[1][start * per_step :]
    order = CropOrder(n, batch, acc, world, 0, seed=3)
    epoch0 = [i for r in range(world) for e, i in full[r][: order.steps_per_epoch * per_step] if e == 0]
    assert set(epoch0) == set(range(n))  # every volume once per epoch over the ranks (wrapped to full steps)
    assert len(epoch0) == order.steps_per_epoch * per_step * world
    assert {e for e, _ in full[0][: order.steps_per_epoch * per_step]} == {0}


@pytest.mark.slow
def test_resume_equivalence(tmp_path):
    """k steps straight == k/2 steps, stop, resume, k/2 steps: same losses, same weights (CPU, fixed seeds)."""
    k = 4
    opts = dict(max_steps=k, warmup_steps=1, accumulate=2)
    straight = run_pretraining(tmp_path / "straight", tiny_options(**opts), RandomCrops(), DATA, DistInfo())
    first = run_pretraining(
        tmp_path / "split", tiny_options(**opts, stop_after=k // 2), RandomCrops(), DATA, DistInfo()
    )
    assert (first.status, first.step) == ("stopped", k // 2)
    assert load_resume_state(tmp_path / "split" / "resume_state.pt")["step"] == k // 2
    second = run_pretraining(
        tmp_path / "split", tiny_options(**opts), RandomCrops(), DATA, DistInfo(), resume=True
    )
    assert (straight.status, second.status, second.step) == ("finished", "finished", k)

    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, k + 1))
    for ra, rb in zip(a, b, strict=True):
        for name in LOSSES:
            assert rb[name] == pytest.approx(ra[name], rel=1e-5, abs=1e-6), (ra["step"], name)
        assert rb["lr"] == ra["lr"]
    assert len({r["loss"] for r in a}) == k  # the steps differ (masks, crops and weights change)
    wa, _ = load_checkpoint(tmp_path / "straight" / "checkpoint_final.safetensors")
    wb, meta = load_checkpoint(tmp_path / "split" / "checkpoint_final.safetensors")
    assert meta.step == k
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_another_data_layout(tmp_path):
    run_pretraining(tmp_path, tiny_options(max_steps=2, stop_after=1), RandomCrops(), DATA, DistInfo())
    with pytest.raises(ValueError, match="batch_size"):
        run_pretraining(
            tmp_path, tiny_options(max_steps=2, batch_size=2), RandomCrops(), DATA, DistInfo(), resume=True
        )


def test_resume_of_a_run_saved_before_newer_config_fields(tmp_path):
    """A checkpoint whose config lacks fields added later (align_target, align_ema) resumes: they default to the
    behaviour before they existed."""
    from mim_nnunet.checkpoint import save_checkpoint

    run_pretraining(tmp_path, tiny_options(max_steps=2, stop_after=1), RandomCrops(), DATA, DistInfo())
    path = tmp_path / "checkpoint_latest.safetensors"
    weights, meta = load_checkpoint(path)
    for key in ("align_target", "align_ema"):
        meta.config.pop(key)
    save_checkpoint(path, weights, meta)  # as an older version wrote it (digests recomputed)
    result = run_pretraining(tmp_path, tiny_options(max_steps=2), RandomCrops(), DATA, DistInfo(), resume=True)
    assert (result.status, result.step) == ("finished", 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        assert dist.world_size == world and dist.rank == rank
        result = run_pretraining(out, tiny_options(max_steps=2, warmup_steps=1), RandomCrops(n=5), DATA, dist)
        torch.save(
            {k: v.clone() for k, v in result.model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt")
        )
    finally:
        shutdown(dist)


@pytest.mark.slow
def test_ddp_two_processes_end_with_equal_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    init = mim_nnunet.build_pretraining_model("tiny").state_dict()
    assert set(p0) == set(p1)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert any(not torch.equal(p0[n], init[n]) for n in p0 if "pos_embed" not in n)  # it trained
    _, meta = load_checkpoint(tmp_path / "checkpoint_final.safetensors")  # rank 0 wrote it
    assert meta.step == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["effective_batch"] == 2
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


class NaNCrops(RandomCrops):
    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1, self.crop, self.crop, self.crop), float("nan"))


def test_non_finite_loss_stops_with_a_clear_error_before_updating(tmp_path):
    with pytest.raises(FloatingPointError, match="step 0: the loss is nan"):
        run_pretraining(tmp_path, tiny_options(max_steps=2), NaNCrops(), DATA, DistInfo())
    assert not (tmp_path / "checkpoint_latest.safetensors").exists()
