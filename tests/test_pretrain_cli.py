"""``mim_nnunet_pretrain`` end to end on the phantom corpus: help, preprocess-only, a tiny run, resume, SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mim_nnunet.checkpoint import load_checkpoint, load_resume_state, read_metadata
from mim_nnunet.cli.pretrain import build_parser, main

TINY = ["--preset", "tiny", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "1", "--no-progress"]


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
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no training step within 240 s"
        time.sleep(0.5)
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
    from mim_nnunet.cli.pretrain import _options as options_from_args

    opts = options_from_args(build_parser().parse_args(["-i", "x", "-o", "y", "--dense-execution", "--grad-checkpointing"]))
    assert opts.model_overrides() == {"packed": False, "grad_checkpointing": True}
    assert options_from_args(build_parser().parse_args(["-i", "x", "-o", "y"])).model_overrides() == {}
