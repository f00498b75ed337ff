"""``mim_nnunet_pretrain`` end to end on the phantom corpus: help, preprocess-only, a tiny run, resume, SIGINT."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mim_nnunet.checkpoint import load_checkpoint, load_resume_state, read_metadata
from mim_nnunet.cli.pretrain import build_parser, main

TINY = ["--preset", "tiny", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "1", "--no-progress"]


def _wait_for_first_step(proc: subprocess.Popen, run: Path) -> Path:
    """Wait until the run has logged a training step (the process must stay alive); returns its metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no training step within 240 s"
        time.sleep(0.5)
    return metrics


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text, flag
        assert action.help and len(action.help) > 10, action.option_strings
    for required in ("-i", "--input", "-o", "--output", "--preset", "--device", "--max-steps", "--epochs", "--batch-size",
                     "--accumulate", "--resume", "--num-workers", "--spacing", "--window", "--seed", "--cache", "--lr",
                     "--blr", "--warmup-steps", "--save-every", "--precision", "--preprocess-only"):  # fmt: skip
        assert required in text, required


@pytest.fixture(scope="module")
def phantom_cache(phantom_corpus, tmp_path_factory):
    """The corpus preprocessed once through ``--preprocess-only``; returns (corpus folder, cache folder)."""
    run = tmp_path_factory.mktemp("prep")
    corpus = str(phantom_corpus[0].parent)
    assert main(["-i", corpus, "-o", str(run), "--preprocess-only", "--no-progress"]) == 0
    return corpus, run / "cache"


def test_preprocess_only(phantom_cache):
    corpus, cache = phantom_cache
    fingerprint = json.loads((cache / "fingerprint.json").read_text())
    assert fingerprint["num_cases"] == 3
    assert not (cache.parent / "checkpoint_latest.safetensors").exists()  # no training happened


def test_no_valid_input_is_a_clear_error(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "no valid case" in caplog.text


@pytest.mark.slow
def test_tiny_pretraining_end_to_end_and_resume(phantom_cache, tmp_path):
    corpus, cache = phantom_cache
    run = tmp_path / "run"
    args = ["-i", corpus, "-o", str(run), "--cache", str(cache), "--max-steps", "3", "--stop-after", "2",
            "--save-every", "1", "--num-workers", "1", *TINY]  # fmt: skip
    assert main(args) == 0
    for name in ("checkpoint_latest.safetensors", "resume_state.pt", "train.log", "progress.png", "config.json",
                 "metrics.jsonl"):  # fmt: skip
        assert (run / name).is_file(), name
    for step in (1, 2):
        for level in (1, 2, 3):
            assert (run / "previews" / f"step_{step:05d}_level{level}.png").stat().st_size > 1000
    assert read_metadata(run / "checkpoint_latest.safetensors").step == 2
    assert not (run / "checkpoint_final.safetensors").exists()  # the schedule is not complete

    # Options fixed by the run cannot change on resume; --stop-after belonged to the first invocation only.
    with pytest.raises(SystemExit, match="batch_size"):
        main(["-o", str(run), "--resume", "--batch-size", "2"])
    # execution-only options may change (here: the dense reference execution for the last step)
    assert main(["-o", str(run), "--resume", "--no-progress", "--dense-execution"]) == 0
    state, meta = load_checkpoint(run / "checkpoint_final.safetensors")
    assert meta.preset == "tiny" and meta.step == 3 and meta.crop_size == 64 and meta.input_size == 32
    assert meta.spacing == [1.5, 1.5, 1.5] and meta.intensity_window == [-1000.0, 1000.0]
    assert meta.corpus["num_cases"] == 3 and meta.code_version
    assert any(k.startswith("encoder.") for k in state)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    log = (run / "train.log").read_text()
    assert "stopped at step 2 of 3" in log and "finished" in log


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(phantom_cache, tmp_path):
    corpus, cache = phantom_cache
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mim_nnunet.cli.pretrain", "-i", corpus, "-o", str(run), "--cache", str(cache),
           "--max-steps", "1000", "--save-every", "1000", "--num-workers", "1", *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    metrics = _wait_for_first_step(proc, run)
    os.kill(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert "interrupted at step" in output
    steps = len(metrics.read_text().splitlines())
    _, meta = load_checkpoint(run / "checkpoint_latest.safetensors")
    assert meta.step == steps >= 1
    assert load_resume_state(run / "resume_state.pt")["step"] == steps
    assert not (run / "checkpoint_final.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_execution_options_reach_the_model():
    from mim_nnunet.pretrain.command import run_options as options_from_args

    opts = options_from_args(build_parser().parse_args(["-i", "x", "-o", "y", "--dense-execution", "--grad-checkpointing"]))
    assert opts.model_overrides() == {"packed": False, "grad_checkpointing": True}
    assert options_from_args(build_parser().parse_args(["-i", "x", "-o", "y"])).model_overrides() == {}


@pytest.mark.parametrize("option", ["--save-every", "--log-every", "--batch-size", "--epochs"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts_are_refused_by_the_parser(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-i", "x", "-o", "y", option, value])
    assert e.value.code == 2
    assert f"argument {option}: must be at least 1, got {value}" in capsys.readouterr().err


def test_a_new_run_refuses_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"old": true}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as e:
        main(["-i", str(tmp_path), "-o", str(run), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run (config.json, metrics.jsonl); continue it with --resume" in err
    assert "Traceback" not in err
    assert (run / "config.json").read_text() == '{"old": true}' and not (run / "train.log").exists()
    with pytest.raises(SystemExit, match="2"):
        main(["-i", str(tmp_path), "-o", str(run), "--resume", "--overwrite"])


@pytest.mark.slow
def test_requeued_command_resumes_and_checks_its_cache(phantom_corpus, tmp_path, monkeypatch, caplog):
    """Relative paths are stored absolute; the identical command with --resume continues; a cache rewritten by
    another run with other settings is refused on resume; a resume from another directory works."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    corpus = os.path.relpath(phantom_corpus[0].parent, work)
    serial = ["--preprocess-workers", "0"]  # the cache is built three times here: no worker start-ups
    cmd = ["-i", corpus, "-o", "run", "--cache", "cache", "--max-steps", "3", "--save-every", "1", "--num-workers",
           "0", "--stop-after", "1", *serial, *TINY]  # fmt: skip
    assert main(cmd) == 0
    data = json.loads((work / "run" / "config.json").read_text())["data"]
    assert data["inputs"] == [str(phantom_corpus[0].parent)] and data["cache"] == str(work / "cache")
    assert not list((work / "cache" / "users").glob("*.json"))  # released at the end

    # a value that differs is refused, naming the run's and the given one
    with pytest.raises(SystemExit, match=r"spacing: run \[1\.5, 1\.5, 1\.5\], given \[2\.0\]"):
        main([*cmd, "--resume", "--spacing", "2.0"])
    # another run rewrites the shared cache with other settings (nothing holds it now) ...
    assert main(["-i", corpus, "-o", "other", "--cache", "cache", "--spacing", "2.0", "--preprocess-only",
                 "--no-progress", *serial]) == 0  # fmt: skip
    # ... and the requeued identical command refuses to train on it, in one line
    caplog.clear()
    assert main([*cmd, "--resume"]) == 2
    assert "no longer holds this run's data: settings_digest" in caplog.text and "Traceback" not in caplog.text
    assert read_metadata(work / "run" / "checkpoint_latest.safetensors").step == 1
    # restored with the run's settings, the identical command continues
    assert main(["-i", corpus, "-o", "restore", "--cache", "cache", "--preprocess-only", "--no-progress", *serial]) == 0
    assert main([*cmd, "--resume"]) == 0
    assert read_metadata(work / "run" / "checkpoint_latest.safetensors").step == 2

    # from another directory: the stored absolute paths are found, no stray cache folder appears
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["-o", str(work / "run"), "--resume", "--no-progress"]) == 0
    _, meta = load_checkpoint(work / "run" / "checkpoint_final.safetensors")
    assert meta.step == 3 and meta.spacing == [1.5, 1.5, 1.5]
    assert meta.corpus["settings"]["spacing"] == [1.5, 1.5, 1.5]  # the embedded fingerprint agrees
    assert list(elsewhere.iterdir()) == []

    # a tampered latest checkpoint and an unreadable previous resume state: one line, exit 2
    for name, edit in (("checkpoint_latest.safetensors", lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:]),
                       ("resume_state_previous.pt", lambda b: b"garbage")):  # fmt: skip
        path = work / "run" / name
        path.write_bytes(edit(path.read_bytes()))
    caplog.clear()
    assert main(["-o", str(work / "run"), "--resume", "--no-progress"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no usable checkpoint to resume from" in errors[0].getMessage()
    assert "sha256" in errors[0].getMessage() and "truncated or corrupted" in errors[0].getMessage()


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits(phantom_cache, tmp_path):
    """Slurm's time limit and scancel signal the whole group: the DataLoader worker must survive, the main process
    finishes the step and saves."""
    corpus, cache = phantom_cache
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mim_nnunet.cli.pretrain", "-i", corpus, "-o", str(run), "--cache", str(cache),
           "--max-steps", "1000", "--save-every", "1000", "--num-workers", "2", *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace", start_new_session=True)  # fmt: skip
    metrics = _wait_for_first_step(proc, run)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "SIGTERM received" in output, output
    steps = len(metrics.read_text().splitlines())
    assert load_checkpoint(run / "checkpoint_latest.safetensors")[1].step == steps >= 1
    assert load_resume_state(run / "resume_state.pt")["step"] == steps
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not list((cache / "users").glob("*.json"))


def test_resume_reindexes_only_a_cache_with_the_same_settings(phantom_cache):
    """Another run sharing the cache with the same settings may have replaced index.json by its own cases: resume
    indexes this run's inputs again (nothing deleted); other settings are never re-indexed, but refused."""
    from mim_nnunet.data.preprocess import PreprocessSettings, cache_identity
    from mim_nnunet.pretrain.resume import other_cases_indexed as _other_cases_indexed

    _, cache = phantom_cache
    mine = cache_identity(cache)
    assert not _other_cases_indexed(cache, mine, PreprocessSettings())
    assert _other_cases_indexed(cache, mine | {"cases_sha256": "0" * 64}, PreprocessSettings())
    assert not _other_cases_indexed(cache, mine | {"cases_sha256": "0" * 64}, PreprocessSettings(spacing=(2.0,) * 3))
    assert not _other_cases_indexed(cache, {}, PreprocessSettings())  # runs that recorded no identity


def test_allow_no_air_lets_a_corpus_of_crops_inside_the_body_in(tmp_path, caplog):
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    arr = (40 + 15 * rng.standard_normal((60, 60, 60))).astype(np.int16)  # soft tissue only: no air
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "roi.nii.gz"))
    cmd = ["-i", str(tmp_path / "roi.nii.gz"), "--preprocess-only", "--no-progress", "--preprocess-workers", "0"]
    with caplog.at_level(logging.WARNING, "mim_nnunet"):
        assert main([*cmd, "-o", str(tmp_path / "strict")]) == 2
    assert "no air" in caplog.text and "--allow-no-air" in caplog.text
    assert main([*cmd, "-o", str(tmp_path / "relaxed"), "--allow-no-air"]) == 0
    assert json.loads((tmp_path / "relaxed" / "cache" / "fingerprint.json").read_text())["num_cases"] == 1


def test_allow_no_air_is_the_runs_and_older_runs_checked_for_air(tmp_path):
    from mim_nnunet.pretrain.resume import ResumeError, resumed_arguments

    args = build_parser().parse_args(["-o", str(tmp_path), "--resume"])
    data = {"inputs": ["x"], "cache": str(tmp_path / "cache"), "spacing": [1.5], "window": [-1000.0, 1000.0]}
    (tmp_path / "config.json").write_text(json.dumps({"options": {"dense_execution": True}, "data": data}))
    resumed = resumed_arguments(args, {"output", "resume"}, tmp_path)  # a config.json from before the option
    assert resumed.allow_no_air is False and resumed.packed is False  # dense_execution: the flag's name
    with pytest.raises(ResumeError, match="allow_no_air cannot change"):
        resumed_arguments(build_parser().parse_args(["-o", "x", "--resume", "--allow-no-air"]),
                          {"output", "resume", "allow_no_air"}, tmp_path)  # fmt: skip
