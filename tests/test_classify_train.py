"""Training runs of the tiny classifier (seconds each): the run folder, stop-and-resume, predict's table."""

from __future__ import annotations

import csv
import json
import shutil
import signal

import numpy as np
import pytest
import torch
from classify_helpers import make_checkpoint, make_dataset

from mim_nnunet.checkpoint import load_checkpoint
from mim_nnunet.classify import batches
from mim_nnunet.classify.dataset import DatasetError
from mim_nnunet.classify.predict import predict
from mim_nnunet.classify.train import PlanRequest, TrainOptions, train
from mim_nnunet.cli.classify import main
from mim_nnunet.pretrain.resume import ResumeError

FAST = dict(epochs=2, num_workers=0, progress=False, device="cpu", fold="all")
REQUEST = PlanRequest(batch_size=2, input_size=[32, 32, 32])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    ds = make_dataset(root / "ds", {"bright": 3, "dark": 3}, test_per_class=2)
    make_checkpoint(root / "tiny.safetensors")
    return ds, root / "tiny.safetensors"


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    ds, ckpt = data
    out = tmp_path_factory.mktemp("runs") / "a"
    assert train(ds, ckpt, out, REQUEST, TrainOptions(**FAST)) == "finished"
    return out


def test_a_run_folder_holds_the_plan_the_checkpoints_and_the_curves(finished):
    saved = json.loads((finished / "plan.json").read_text())
    assert saved["plan"]["input_size"] == [32, 32, 32] and saved["plan"]["batch_size"] == 2
    assert saved["options"]["epochs"] == 2 and saved["fold"]["val"] == [] and len(saved["fold"]["train"]) == 6
    for name in ("checkpoint_final.safetensors", "checkpoint_latest.safetensors", "resume_state.pt",
                 "checkpoint_previous.safetensors", "progress.png", "train.log"):  # fmt: skip
        assert (finished / name).is_file(), name
    records = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert len(list((finished / "preprocessed").glob("*.npy"))) == 6


def test_a_new_run_refuses_a_folder_with_a_run_and_resume_of_a_finished_run_trains_nothing(data, finished):
    ds, ckpt = data
    with pytest.raises(ResumeError, match="already holds a run"):
        train(ds, ckpt, finished, REQUEST, TrainOptions(**FAST))
    before = (finished / "checkpoint_final.safetensors").stat().st_mtime_ns
    assert train(None, None, finished, REQUEST, TrainOptions(**FAST), resume=True) == "finished"
    assert (finished / "checkpoint_final.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ResumeError, match="seed"):
        train(None, None, finished, REQUEST, TrainOptions(**FAST | {"seed": 5}), resume=True, given={"seed"})


def test_a_stop_mid_epoch_saves_and_the_continued_run_equals_the_uninterrupted_one(data, finished, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    ds, ckpt = data
    original = batches.TrainingCases.__getitem__

    def getitem(self, key):
        if key[:2] == (1, 2):  # epoch 1, the first case of its second batch: as if Ctrl-C came then
            signal.raise_signal(signal.SIGINT)
        return original(self, key)

    monkeypatch.setattr(batches.TrainingCases, "__getitem__", getitem)
    out = tmp_path / "b"
    assert train(ds, ckpt, out, REQUEST, TrainOptions(**FAST)) == "interrupted"
    rs = torch.load(out / "resume_state.pt", weights_only=True)
    assert (rs["epoch"], rs["batch"]) == (1, 2) and not (out / "checkpoint_final.safetensors").exists()
    monkeypatch.setattr(batches.TrainingCases, "__getitem__", original)
    assert train(None, None, out, REQUEST, TrainOptions(**FAST), resume=True) == "finished"
    a, _ = load_checkpoint(finished / "checkpoint_final.safetensors")
    b, _ = load_checkpoint(out / "checkpoint_final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches, the same steps: bit-identical on CPU
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (finished, out)]
    assert losses[0] == pytest.approx(losses[1])


def test_predict_writes_one_row_per_case_with_probabilities_that_sum_to_one(data, finished, tmp_path):
    ds, _ = data
    rows = predict([finished], ds / "imagesTs", tmp_path / "p.csv", device="cpu", progress=False)
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["case", "class", "p_bright", "p_dark"]
    assert [r["case"] for r in table] == sorted(p.name[:-12] for p in (ds / "imagesTs").glob("*_0000.nii.gz"))
    for r in table:
        p = [float(r["p_bright"]), float(r["p_dark"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-6) and r["class"] == ["bright", "dark"][int(np.argmax(p))]
    assert len(rows) == 4


def test_repeated_runs_average_their_probabilities(data, finished, tmp_path):
    ds, ckpt = data
    other = tmp_path / "seed1"
    train(ds, ckpt, other, REQUEST, TrainOptions(**FAST | {"epochs": 1, "seed": 1}))
    one = predict([finished], ds / "imagesTs", tmp_path / "1.csv", device="cpu", progress=False)
    two = predict([other], ds / "imagesTs", tmp_path / "2.csv", device="cpu", progress=False)
    both = predict([finished, other], ds / "imagesTs", tmp_path / "b.csv", device="cpu", progress=False)
    for a, b, m in zip(one, two, both):
        assert m["p_dark"] == pytest.approx((a["p_dark"] + b["p_dark"]) / 2, abs=1e-7)
    assert any(a["p_dark"] != b["p_dark"] for a, b in zip(one, two))


def test_predict_on_a_run_without_a_checkpoint_names_the_file(data, finished, tmp_path, capsys):
    ds, _ = data
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(finished / "plan.json", empty / "plan.json")
    with pytest.raises(DatasetError, match="checkpoint_final.safetensors: no final checkpoint"):
        predict([empty], ds / "imagesTs", tmp_path / "p.csv", device="cpu")
    with pytest.raises(SystemExit) as e:
        main(["predict", "-m", str(tmp_path / "nothing"), "-i", str(ds / "imagesTs"), "-o", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "nothing" in err and "no plan.json" in err and "\n" not in err
    assert not (tmp_path / "p.csv").exists()


def test_train_with_a_file_that_is_not_a_mim_checkpoint_fails_in_one_line_before_writing(data, tmp_path, capsys):
    ds, _ = data
    junk = tmp_path / "junk.pth"
    torch.save({"model": {}}, junk)
    with pytest.raises(SystemExit) as e:
        main(["train", "-i", str(ds), "-pt", str(junk), "-o", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and str(junk) in err and "MiM checkpoint" in err and "\n" not in err
    assert not (tmp_path / "run" / "plan.json").exists()


def test_every_batch_is_a_function_of_the_seed_and_ranks_get_equal_shares(finished):
    from mim_nnunet.classify.batches import TrainingCases, epoch_order

    saved = json.loads((finished / "plan.json").read_text())
    cases = saved["fold"]["train"]
    data = TrainingCases(finished / "preprocessed", cases, [0] * len(cases), [32, 32, 32], seed=0)
    a, b = data[(3, 1, 2)][0], data[(3, 1, 2)][0]
    assert a.shape == (1, 32, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, TrainingCases(finished / "preprocessed", cases, [0] * 6, [32] * 3, seed=1)[(3, 1, 2)][0])
    assert epoch_order(6, 0, 3) == epoch_order(6, 0, 3) != epoch_order(6, 0, 4)
    shares = [epoch_order(7, 0, 0, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # 7 cases on 3 ranks: padded to 9, as DistributedSampler
    assert {k[2] for s in shares for k in s} == set(range(7))


def test_overwrite_replaces_a_run_and_its_folds(data, tmp_path):
    ds, ckpt = data
    out = tmp_path / "o"
    train(ds, ckpt, out, REQUEST, TrainOptions(**FAST | {"epochs": 1}))
    (out / "splits_final.json").write_text("[]")  # a stale split of an earlier dataset
    (out / "preprocessed" / "preprocessing.json").write_text("{}")  # arrays made with other settings
    assert train(ds, ckpt, out, REQUEST, TrainOptions(**FAST | {"epochs": 1}), overwrite=True) == "finished"
    assert not (out / "splits_final.json").exists()
    assert json.loads((out / "preprocessed" / "preprocessing.json").read_text())["spacing"] == [1.5] * 3
    assert len(list((out / "preprocessed").glob("*.npy"))) == 6
