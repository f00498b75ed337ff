"""Long runs that cannot lose or mix data (issue 12), at the level of :func:`run_pretraining`: kills between the two
writes of a save, run folders that already hold a run, partial metrics lines, DDP collectives on every rank."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import DATA, RandomCrops, tiny_options

from mim_nnunet.checkpoint import CheckpointError, load_checkpoint, load_resume_state
from mim_nnunet.pretrain import folder as folder_module
from mim_nnunet.pretrain import run as run_module
from mim_nnunet.pretrain.distributed import DistInfo, init_distributed, shutdown
from mim_nnunet.pretrain.run import (
    CHECKPOINT_FINAL,
    CHECKPOINT_LATEST,
    CHECKPOINT_PREVIOUS,
    RESUME_STATE,
    RESUME_STATE_PREVIOUS,
    ResumeError,
    RunFolderError,
    read_metrics,
    run_pretraining,
)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception`` clean-up)."""


def _weights(path):
    return load_checkpoint(path)[0]


def _assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps without interruption: the reference weights at every step."""
    out = tmp_path_factory.mktemp("straight")
    run_pretraining(out, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo())
    return out


def test_kill_between_checkpoint_and_resume_state_falls_back_to_the_previous_pair(
    tmp_path, straight, monkeypatch, caplog
):
    real = run_module.save_resume_state
    calls = []

    def killed_at_step_3(path, state):
        calls.append(state["step"])
        if state["step"] == 3:
            raise Killed  # the checkpoint of step 3 is on disk, its resume state is not
        real(path, state)

    monkeypatch.setattr(run_module, "save_resume_state", killed_at_step_3)
    with pytest.raises(Killed):
        run_pretraining(tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo())
    monkeypatch.setattr(run_module, "save_resume_state", real)
    assert load_checkpoint(tmp_path / CHECKPOINT_LATEST)[1].step == 3
    assert load_resume_state(tmp_path / RESUME_STATE)["step"] == 2
    assert load_checkpoint(tmp_path / CHECKPOINT_PREVIOUS)[1].step == 2  # the complete pair before
    assert load_resume_state(tmp_path / RESUME_STATE_PREVIOUS)["step"] == 2

    with caplog.at_level(logging.WARNING, "mim_nnunet"):
        result = run_pretraining(
            tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo(), resume=True
        )
    assert "continuing from the previous pair, step 2" in caplog.text
    assert (result.status, result.step) == ("finished", 4)
    _assert_identical(_weights(tmp_path / CHECKPOINT_FINAL), _weights(straight / CHECKPOINT_FINAL))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_kill_while_keeping_the_previous_pair_leaves_the_latest(tmp_path, straight, monkeypatch):
    real = folder_module.link_or_copy

    def killed_between_the_links(src, dst):
        if dst.name == CHECKPOINT_PREVIOUS and load_resume_state(src.parent / RESUME_STATE)["step"] == 2:
            raise Killed  # resume_state_previous is new (step 2), checkpoint_previous still old (step 1)
        real(src, dst)

    monkeypatch.setattr(folder_module, "link_or_copy", killed_between_the_links)
    with pytest.raises(Killed):
        run_pretraining(tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo())
    monkeypatch.setattr(folder_module, "link_or_copy", real)
    result = run_pretraining(
        tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo(), resume=True
    )
    assert result.step == 4
    _assert_identical(_weights(tmp_path / CHECKPOINT_FINAL), _weights(straight / CHECKPOINT_FINAL))


def test_no_usable_pair_is_one_checkpoint_error(tmp_path):
    run_pretraining(tmp_path, tiny_options(max_steps=3, save_every=1, stop_after=2), RandomCrops(), DATA, DistInfo())
    for name in (CHECKPOINT_LATEST, CHECKPOINT_PREVIOUS):
        data = bytearray((tmp_path / name).read_bytes())
        data[-3] ^= 0xFF
        (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint to resume from: .*latest.*sha256.*previous.*sha256"):
        run_pretraining(tmp_path, tiny_options(max_steps=3), RandomCrops(), DATA, DistInfo(), resume=True)


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    run_pretraining(tmp_path, tiny_options(max_steps=2, stop_after=1), RandomCrops(), DATA, DistInfo())
    before = {n: (tmp_path / n).read_bytes() for n in ("config.json", "metrics.jsonl", CHECKPOINT_LATEST)}
    with pytest.raises(RunFolderError, match=r"already holds a run .*--resume.*--overwrite"):
        run_pretraining(tmp_path, tiny_options(max_steps=2, lr=5e-4), RandomCrops(), DATA, DistInfo())
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # untouched
    result = run_pretraining(
        tmp_path, tiny_options(max_steps=1, lr=5e-4, seed=1), RandomCrops(), DATA, DistInfo(), overwrite=True
    )
    assert result.step == 1
    assert json.loads((tmp_path / "config.json").read_text())["options"]["seed"] == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_resume_before_the_first_save_starts_from_step_0(tmp_path, straight):
    """A run killed before its first checkpoint (config.json written, nothing saved) starts over on resume."""
    (tmp_path / "config.json").write_text("{}")
    result = run_pretraining(
        tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo(), resume=True
    )
    assert result.step == 4
    _assert_identical(_weights(tmp_path / CHECKPOINT_FINAL), _weights(straight / CHECKPOINT_FINAL))


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    run_pretraining(tmp_path, tiny_options(max_steps=2, stop_after=1), RandomCrops(), DATA, DistInfo())
    with pytest.raises(ResumeError, match=r"trained on other data .*spacing \[1\.5, 1\.5, 1\.5\] vs now \[2\.0, 2\.0, 2\.0\]"):
        run_pretraining(tmp_path, tiny_options(max_steps=2), RandomCrops(), DATA | {"spacing": [2.0] * 3}, DistInfo(),
                        resume=True)  # fmt: skip


def test_partial_last_metrics_line_is_skipped_with_a_warning(tmp_path, straight, caplog):
    run_pretraining(tmp_path, tiny_options(max_steps=4, save_every=1, stop_after=2), RandomCrops(), DATA, DistInfo())
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed mid-line
    with caplog.at_level(logging.WARNING, "mim_nnunet"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
        run_pretraining(tmp_path, tiny_options(max_steps=4, save_every=1), RandomCrops(), DATA, DistInfo(), resume=True)
    assert "line 3 is not a complete record" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    _assert_identical(_weights(tmp_path / CHECKPOINT_FINAL), _weights(straight / CHECKPOINT_FINAL))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_finished_resume(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        opts = tiny_options(max_steps=1, warmup_steps=0)
        run_pretraining(out, opts, RandomCrops(n=2), DATA, dist)
        dist_barrier = torch.distributed.barrier
        dist_barrier()
        if rank == 0:
            os.remove(os.path.join(out, CHECKPOINT_FINAL))  # e.g. deleted to save space, or a kill before its write
        dist_barrier()
        result = run_pretraining(out, opts, RandomCrops(n=2), DATA, dist, resume=True)
        dist_barrier()  # both ranks are still in the group afterwards
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"status": result.status, "step": result.step}, f)
    finally:
        shutdown(dist)


@pytest.mark.slow
def test_ddp_resume_of_a_finished_schedule_saves_on_every_rank(tmp_path):
    ctx = mp.start_processes(_ddp_finished_resume, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the ranks hang (a collective reached by one rank only)"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"status": "finished", "step": 1}
    assert load_checkpoint(tmp_path / CHECKPOINT_FINAL)[1].step == 1
