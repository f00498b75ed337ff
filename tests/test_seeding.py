"""Seeds that fix every batch (issue 18, point 1): unit tests of the seeding parts, and end to end on nnU-Net:
two study arms at one seed draw the same batches, two runs of one arm at one seed with 2 augmentation workers
end with bit-identical weights, and without a seed nnU-Net's own (non-deterministic) augmenter is kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_worker_seeds_are_deterministic_and_distinct():
    from mim_nnunet.nnunet.seeding import TRAIN_STREAM, VAL_STREAM, worker_seeds

    a = worker_seeds(3, TRAIN_STREAM, 4)
    assert a == worker_seeds(3, TRAIN_STREAM, 4)
    assert len(set(a)) == 4
    assert not set(a) & set(worker_seeds(3, VAL_STREAM, 4))  # the two streams draw different numbers
    assert not set(a) & set(worker_seeds(4, TRAIN_STREAM, 4))  # and so do two run seeds
    assert all(0 <= s < 2**32 for s in a)


class _Loader:
    """A stand-in batchgenerators loader: draws from numpy's and torch's global generators."""

    def __init__(self):
        self.thread_id, self.was_initialized, self.batch_size = None, True, 2

    def set_thread_id(self, thread_id):
        self.thread_id = thread_id

    def __next__(self):
        return float(np.random.rand()), float(torch.rand(1))


def test_seeded_worker_loader_seeds_numpy_and_torch_per_worker():
    from mim_nnunet.nnunet.seeding import SeededWorkerLoader

    draws, threads = [], torch.get_num_threads()
    for thread_id in (0, 1, 0):
        np.random.seed(123), torch.manual_seed(123)  # whatever the worker inherited
        w = SeededWorkerLoader(_Loader(), [11, 22])
        w.set_thread_id(thread_id)
        draws.append(next(w))
        assert w.loader.thread_id == thread_id and w.batch_size == 2  # delegated
    assert draws[0] == draws[2] and draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]
    w.was_initialized = False  # the augmenter's reset reaches the wrapped loader
    assert w.loader.was_initialized is False
    assert torch.get_num_threads() == 1  # a worker computes on one thread (fork-safe), as nnU-Net's own workers
    torch.set_num_threads(threads)


def test_without_a_seed_get_dataloaders_is_nnunets():
    from mim_nnunet.nnunet.seeding import SeededBatchesMixin

    class Parent:
        def get_dataloaders(self):
            return "nnU-Net's augmenters"

    class Trainer(SeededBatchesMixin, Parent):
        pass

    assert Trainer().get_dataloaders() == "nnU-Net's augmenters"


def test_env_seed(monkeypatch):
    from mim_nnunet.nnunet.trainer import SEED_ENV, env_seed

    monkeypatch.delenv(SEED_ENV, raising=False)
    assert env_seed() is None
    monkeypatch.setenv(SEED_ENV, "")
    assert env_seed() is None
    monkeypatch.setenv(SEED_ENV, "7")
    assert env_seed() == 7
    monkeypatch.setenv(SEED_ENV, "seven")
    with pytest.raises(ValueError, match="MIM_NNUNET_SEED='seven'"):
        env_seed()


# ---- end to end ------------------------------------------------------------------------------------------------
#: Draws 4 training batches per probe, every probe of one test in one process (each process start imports
#: torch and nnU-Net again): argv dataset, fold, then a JSON list of [tag, trainer, plans, {env}]; each probe
#: runs with the process's environment plus its own variables (the seeds), as a fresh process would.
PROBE = """
import hashlib, json, os, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
base = dict(os.environ)
for tag, name, plans, extra in json.loads(sys.argv[3]):
    os.environ.clear()
    os.environ.update(base, **extra)
    trainer = get_trainer_from_args(sys.argv[1], "3d_fullres", int(sys.argv[2]), name, plans,
                                    device=torch.device("cpu"))
    trainer.initialize()
    train, val = trainer.get_dataloaders()
    digests = []
    for _ in range(4):
        b = next(train)
        h = hashlib.sha256(b["data"].numpy().tobytes())
        for t in (b["target"] if isinstance(b["target"], list) else [b["target"]]):
            h.update(t.numpy().tobytes())
        digests.append(h.hexdigest()[:16])
    print("PROBE", tag, type(train).__name__, *digests, flush=True)
    for g in (train, val):
        if hasattr(g, "_finish"):
            g._finish()
"""


def _study_module():
    return load_benchmark("study_label_efficiency")


@pytest.fixture(scope="module")
def quick_study(quick_study_stages):
    """The --quick study's data, pre-training and plans (conftest.py, shared with the --quick study tests)."""
    mod = _study_module()
    return mod, mod.Study(quick_study_stages, mod.Settings(**mod.QUICK))


def _env(study, **extra) -> dict:
    env = dict(study.env, nnUNet_n_proc_DA="2", OMP_NUM_THREADS="1", **extra)
    for name in ("MIM_NNUNET_SEED", "MIM_NNUNET_STUDY_SEED"):
        if name not in extra:
            env.pop(name, None)
    return env


def _probes(study, probes: dict[str, tuple[str, str, dict]]) -> dict[str, list[str]]:
    """{tag: (trainer, plans, seed variables)} -> {tag: [augmenter class, 4 batch digests]}, in one process whose
    environment has no seed variable (``_env``)."""
    spec = json.dumps([[tag, trainer, plans, extra] for tag, (trainer, plans, extra) in probes.items()])
    cmd = [sys.executable, "-c", PROBE, str(study.dataset_id), str(study.fold(1)), spec]
    out = subprocess.run(cmd, env=_env(study), capture_output=True, text=True, encoding="utf-8", errors="replace",
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [x.split()[1:] for x in out.stdout.splitlines() if x.startswith("PROBE ")]
    assert [line[0] for line in lines] == list(probes), out.stdout[-2000:]
    return {line[0]: line[1:] for line in lines}


@pytest.mark.slow
def test_two_arms_at_one_seed_draw_the_same_batches_and_unseeded_runs_keep_nnunets_augmenter(quick_study):
    mod, study = quick_study
    mim, scratch = mod.ARMS["MiM"], mod.ARMS["scratch"]
    plain = "nnUNetTrainerMiM"  # seeded with MIM_NNUNET_SEED, nnU-Net's own augmenter without it
    seed = {"MIM_NNUNET_STUDY_SEED": "5"}
    p = _probes(study, {
        "a": (mim.trainer, study.plans_name("MiM"), seed),
        "b": (scratch.trainer, study.plans_name("scratch"), seed),
        "c": (scratch.trainer, study.plans_name("scratch"), {"MIM_NNUNET_STUDY_SEED": "6"}),
        "d": (plain, study.plans_name("MiM"), {"MIM_NNUNET_SEED": "5"}),
        "e": (plain, study.plans_name("MiM"), {}),
    })  # fmt: skip
    a = p["a"]
    assert a[0] == "MultiThreadedAugmenter" and a == p["b"]  # same batches in the same order, both arms
    assert p["c"][1:] != a[1:] and len(set(a[1:])) == 4  # another seed, other batches; the batches differ
    assert p["d"] == a  # the same seed, the same batches as the study trainers
    assert p["e"][0] == "NonDetMultiThreadedAugmenter"


@pytest.mark.slow
def test_two_runs_of_one_arm_at_one_seed_end_with_bit_identical_weights(quick_study, tmp_path):
    mod, study = quick_study
    arm = mod.ARMS["MiM"]
    plans, fold = study.plans_name("MiM"), study.fold(1)

    def train(tag: str, seed: int) -> dict:
        results = tmp_path / tag
        env = _env(study, nnUNet_results=str(results), MIM_NNUNET_STUDY_SEED=str(seed),
                   MIM_NNUNET_STUDY_EPOCHS="1", MIM_NNUNET_STUDY_ITERS="4")  # fmt: skip
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(mod.DATASET_ID), "3d_fullres", str(fold),
               "-tr", arm.trainer, "-p", plans, "-device", "cpu"]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                             timeout=900)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        model = results / mod.DATASET / f"{arm.trainer}__{plans}__3d_fullres" / f"fold_{fold}"
        log = next(model.glob("training_log_*.txt")).read_text()
        weights = torch.load(model / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        return weights["network_weights"], log

    (a, log), (b, _), (c, _) = train("a", 0), train("b", 0), train("c", 1)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ between two runs at seed 0, e.g. {differing[:3]}"
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and the seed matters
    assert "seeded batches (seed 0, 2 training and 1 validation augmentation workers" in log
