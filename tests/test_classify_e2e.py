"""The whole classification path through the command line: train (5-fold split, 2 epochs), resume, predict,
evaluate; a linear probe leaves the encoder as the checkpoint has it; from scratch trains the same network. And
two DDP processes (gloo) training one run."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from classify_helpers import make_checkpoint, make_dataset

from mim_nnunet.checkpoint import load_checkpoint
from mim_nnunet.classify.train import PlanRequest, TrainOptions, train
from mim_nnunet.cli.classify import main

COMMON = ["--device", "cpu", "--epochs", "2", "--num-workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.mark.slow
def test_train_resume_predict_evaluate_and_the_linear_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)  # the run makes its own folds
    make_dataset(tmp_path / "Dataset777_Lesions", {"none": 6, "bright": 6}, test_per_class=3)
    ckpt = tmp_path / "mim.safetensors"
    mim, _ = make_checkpoint(ckpt)
    run = tmp_path / "run"
    assert main(["train", "-i", "777", "-pt", str(ckpt), "-o", str(run), "--fold", "0", *COMMON]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["plan"]["input_size"] == [32, 32, 32] and plan["plan"]["spacing"] == [1.5, 1.5, 1.5]
    val = plan["fold"]["val"]
    assert 2 <= len(val) <= 4 and sum(plan["fold"]["train_class_counts"].values()) == 12 - len(val)
    splits = json.loads((run / "splits_final.json").read_text())
    assert plan["fold"]["val"] == splits[0]["val"] and len(splits) == 5
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all("val_accuracy" in r and "val_auroc" in r for r in records)
    for name in ("checkpoint_final.safetensors", "checkpoint_best.safetensors", "progress.png"):
        assert (run / name).is_file(), name
    # a kill-free resume of the finished run: nothing trained again, exit 0
    assert main(["train", "-o", str(run), "--resume", *COMMON]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    preds = tmp_path / "out" / "predictions.csv"
    ds = tmp_path / "Dataset777_Lesions"
    assert main(["predict", "-m", str(run), "-i", str(ds / "imagesTs"), "-o", str(preds), "--device", "cpu"]) == 0
    assert len(preds.read_text().splitlines()) == 1 + 6
    assert main(["evaluate", "-p", str(preds), "-r", str(ds / "classesTs.csv"), "-o", str(tmp_path / "out" / "m.json")]) == 0
    metrics = json.loads((tmp_path / "out" / "m.json").read_text())
    assert metrics["cases"] == 6 and 0 <= metrics["accuracy"] <= 1 and len(metrics["confusion_matrix"]) == 2
    assert (tmp_path / "out" / "confusion.png").is_file() and (tmp_path / "out" / "roc.png").is_file()

    probe = tmp_path / "probe"
    assert main(["train", "-i", str(ds), "-pt", str(ckpt), "-o", str(probe), "--fold", "all", "--linear-probe",
                 "--pooling", "attention", *COMMON]) == 0  # fmt: skip
    state, _ = load_checkpoint(probe / "checkpoint_final.safetensors")
    theirs = mim.encoder.state_dict()
    assert all(torch.equal(state[f"encoder.{k}"], v) for k, v in theirs.items() if k != "pos_embed")
    first = json.loads((probe / "metrics.jsonl").read_text().splitlines()[0])
    assert "val_accuracy" not in first  # --fold all validates on nothing

    scratch = tmp_path / "scratch"
    assert main(["train", "-i", str(ds), "-pt", str(ckpt), "-o", str(scratch), "--fold", "all", "--from-scratch",
                 *COMMON[:3], "1", *COMMON[4:]]) == 0  # fmt: skip
    s_state, _ = load_checkpoint(scratch / "checkpoint_final.safetensors")
    assert set(s_state) == set(state) - {k for k in state if k.startswith("pool.")}
    assert not torch.equal(s_state["encoder.blocks.0.attn.qkv.weight"], theirs["blocks.0.attn.qkv.weight"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, ds: str, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    opts = TrainOptions(fold="all", epochs=2, num_workers=0, progress=False, device="cpu")
    assert train(ds, ckpt, out, PlanRequest(batch_size=2, input_size=[32, 32, 32]), opts) == "finished"


@pytest.mark.slow
def test_two_ddp_processes_share_the_epoch_and_rank_0_writes_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    ds = make_dataset(tmp_path / "ds", {"none": 4, "bright": 3})  # 7 cases: rank shares padded to 4 + 4
    make_checkpoint(tmp_path / "mim.safetensors")
    out = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(ds), str(tmp_path / "mim.safetensors"), str(out)), nprocs=2,
             join=True)  # fmt: skip
    rs = torch.load(out / "resume_state.pt", weights_only=True)
    assert rs["order"]["world_size"] == 2 and (rs["epoch"], rs["batch"]) == (2, 0)
    assert rs["step"] == 2 * 2  # two batches of two per rank and epoch
    assert (out / "checkpoint_final.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
