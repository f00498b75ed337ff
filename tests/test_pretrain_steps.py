"""The steps of :func:`run_pretraining`, each on its own (build, restore, save, report), the stop mechanism, and
the contract of a run folder written by today's code: its file names, config.json and resume_state.pt keys."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from pretrain_helpers import DATA, RandomCrops, tiny_options

from mim_nnunet.checkpoint import load_checkpoint, load_resume_state
from mim_nnunet.interrupt import Interrupted, StopRequest
from mim_nnunet.model.config import preset_crop_size
from mim_nnunet.pretrain import folder
from mim_nnunet.pretrain.distributed import DistInfo
from mim_nnunet.pretrain.run import (
    StepReport,
    build_run,
    report_start,
    restore_run,
    run_config,
    run_pretraining,
    save,
)

# the contract (issue 17, point 6): what a run folder holds and what its two JSON/torch files are keyed by
CONFIG_KEYS = {"options", "model", "data", "derived", "code_version"}
OPTION_KEYS = {
    "preset", "levels", "grad_checkpointing", "dense_execution", "align_target", "align_ema", "batch_size",
    "accumulate", "max_steps", "epochs", "lr", "blr", "min_lr", "weight_decay", "warmup_steps", "clip_grad",
    "precision", "seed", "num_workers", "save_every", "log_every", "stop_after", "progress", "probe",
    "probe_every", "probe_cases",
}  # fmt: skip
RESUME_STATE_KEYS = {"format", "step", "weights_sha256", "optimizer", "scaler", "schedule", "data", "rng"}


def test_build_run_starts_at_step_zero_with_the_schedule(tmp_path):
    run = build_run(tmp_path, tiny_options(max_steps=5, stop_after=2), RandomCrops(), DATA, DistInfo())
    assert (run.start, run.end, run.sched.total_steps) == (0, 2, 5)
    assert run.model.config.packed and run.preview_crop.shape == (1, 1, 64, 64, 64)
    assert build_run(tmp_path, tiny_options(packed=False), RandomCrops(), DATA, DistInfo()).model.config.packed is False
    assert preset_crop_size("tiny") == 64 and preset_crop_size("base") == 192


def test_config_json_keeps_its_keys_and_the_flags_name(tmp_path):
    run = build_run(tmp_path, tiny_options(packed=False), RandomCrops(), DATA, DistInfo())
    info = run_config(run)
    assert set(info) == CONFIG_KEYS and set(info["options"]) == OPTION_KEYS
    assert info["options"]["dense_execution"] is True  # the code's packed=False, under the flag's name
    assert folder.options_from_config(info["options"])["packed"] is False
    report_start(run, 4, resume=False)
    assert json.loads((tmp_path / folder.CONFIG).read_text()) == json.loads(json.dumps(info))
    assert (tmp_path / folder.METRICS).read_text() == ""


def test_save_writes_the_pair_then_keeps_it_as_previous(tmp_path):
    run = build_run(tmp_path, tiny_options(), RandomCrops(), DATA, DistInfo())
    save(run, 0)
    weights, meta = load_checkpoint(tmp_path / folder.CHECKPOINT_LATEST)
    state = load_resume_state(tmp_path / folder.RESUME_STATE)
    assert set(state) == RESUME_STATE_KEYS and state["weights_sha256"] == meta.weights_sha256 and meta.step == 0
    assert run.pair_complete and not (tmp_path / folder.CHECKPOINT_PREVIOUS).exists()
    assert sorted(p.name for p in (tmp_path / folder.PREVIEWS).iterdir())
    save(run, 1, final=True)
    assert load_resume_state(tmp_path / folder.RESUME_STATE_PREVIOUS)["step"] == 0
    assert load_checkpoint(tmp_path / folder.CHECKPOINT_FINAL)[1].step == 1


def test_restore_run_continues_from_the_saved_step(tmp_path):
    first = build_run(tmp_path, tiny_options(), RandomCrops(), DATA, DistInfo())
    report_start(first, 4, resume=False)
    with torch.no_grad():
        next(first.model.parameters()).add_(1.0)  # weights a fresh build does not have
    save(first, 3)
    again = build_run(tmp_path, tiny_options(), RandomCrops(), DATA, DistInfo())
    restore_run(again)
    assert (again.start, again.pair_complete, again.order.start_step) == (3, True, 3)
    assert torch.equal(next(again.model.parameters()), next(first.model.parameters()))


def test_step_report_logs_saves_when_due_and_stops_on_request(tmp_path):
    run = build_run(tmp_path, tiny_options(max_steps=4, save_every=2), RandomCrops(), DATA, DistInfo())
    report_start(run, 4, resume=False)
    metrics = {"loss": 1.0, "lr": 1e-3, "crops_per_s": 2.0}
    stop = StopRequest()
    with StepReport(run, stop) as report:
        assert report(1, metrics) is False and not (tmp_path / folder.CHECKPOINT_LATEST).exists()
        assert report(2, metrics) is False and (tmp_path / folder.CHECKPOINT_LATEST).exists()
        stop.requested = True  # what a first SIGINT/SIGTERM does
        assert report(3, metrics) is True
    assert [r["step"] for r in folder.read_metrics(tmp_path)] == [1, 2, 3]
    assert load_resume_state(tmp_path / folder.RESUME_STATE)["step"] == 3


def test_a_run_folder_of_todays_code_resumes(tmp_path):
    """Written by today's code path, stopped half-way, continued: the same files, and it finishes."""
    first = run_pretraining(tmp_path, tiny_options(max_steps=3, save_every=1, stop_after=2), RandomCrops(), DATA,
                            DistInfo())  # fmt: skip
    assert (first.status, first.step) == ("stopped", 2)
    # (train.log is the command's: run_pretraining alone writes none)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "metrics.jsonl", "progress.png", "previews", "checkpoint_latest.safetensors",
        "resume_state.pt", "checkpoint_previous.safetensors", "resume_state_previous.pt",
    }  # fmt: skip
    assert set(json.loads((tmp_path / folder.CONFIG).read_text())["options"]) == OPTION_KEYS
    done = run_pretraining(tmp_path, tiny_options(max_steps=3, save_every=1), RandomCrops(), DATA, DistInfo(),
                           resume=True)  # fmt: skip
    assert (done.status, done.step) == ("finished", 3)
    assert load_checkpoint(tmp_path / folder.CHECKPOINT_FINAL)[1].step == 3


def test_stop_request_finishes_the_step_first_then_aborts_on_a_second_signal():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # restored


def test_stop_request_at_once_raises_at_the_first_signal():
    with pytest.raises(Interrupted) as e, StopRequest(at_once=True):
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM
