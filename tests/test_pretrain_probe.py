"""The linear probe of pre-training (pretrain/probe.py): it separates informative from random features, runs on a
labeled nnU-Net dataset preprocessed like pre-training, and logs a Dice through a run and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_helpers import DATA, RandomCrops, tiny_options

import mim_nnunet
from mim_nnunet.cli.pretrain import main
from mim_nnunet.pretrain.distributed import DistInfo
from mim_nnunet.pretrain.probe import LinearProbe, fit_softmax, mean_dice
from mim_nnunet.pretrain.run import read_metrics, run_pretraining


def test_classifier_and_dice_tell_informative_from_random_features():
    g = torch.Generator().manual_seed(0)
    y_fit, y_score = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (2000,), generator=g)

    def features(y: torch.Tensor, informative: bool) -> torch.Tensor:
        noise = torch.randn(len(y), 16, generator=g)
        if informative:
            noise[:, :4] += 2.0 * torch.nn.functional.one_hot(y, 4)
        return noise

    good = mean_dice(fit_softmax(features(y_fit, True), y_fit, 4)(features(y_score, True)), y_score, 4)
    bad = mean_dice(fit_softmax(features(y_fit, False), y_fit, 4)(features(y_score, False)), y_score, 4)
    assert good > 0.8 and bad < 0.4
    assert mean_dice(y_score, y_score, 4) == 1.0
    assert math.isnan(mean_dice(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), 4))


class NoiseEncoder(torch.nn.Module):
    """Maps of the encoder's shapes that ignore the image: what a probe on useless features sees."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.randn_like(m) for m in self.encoder(x)]


def test_probe_on_a_labeled_dataset_beats_noise_features(phantom_dataset):
    probe = LinearProbe.from_dataset(
        phantom_dataset, cases=1, crop=64, spacing=[1.5] * 3, window=[-1000, 1000]
    )
    assert len(probe.fit_cases) == 1 and len(probe.score_cases) == 1 and probe.num_classes == 4
    assert probe.fit_cases[0].image.shape == (1, 64, 64, 64)
    assert 0.0 <= float(probe.fit_cases[0].image.min()) and float(probe.fit_cases[0].image.max()) <= 1.0
    torch.manual_seed(0)
    encoder = mim_nnunet.build_pretraining_model("tiny").encoder
    real = probe(encoder, torch.device("cpu"))
    torch.manual_seed(0)
    noise = probe(NoiseEncoder(encoder), torch.device("cpu"))
    assert 0.0 <= real["probe_dice"] <= 1.0 and real["probe_seconds"] > 0
    # even a random conv encoder passes the organs' intensity through; noise features carry nothing
    assert real["probe_dice"] > noise["probe_dice"] + 0.1
    assert encoder.training  # the probe restores the mode it found


@pytest.mark.slow
def test_run_logs_the_probe_at_the_first_every_nth_and_last_step(phantom_dataset, tmp_path):
    opts = tiny_options(max_steps=3, probe=str(phantom_dataset), probe_every=2, probe_cases=1)
    run_pretraining(tmp_path, opts, RandomCrops(), DATA, DistInfo())
    records = read_metrics(tmp_path)
    probed = {r["step"]: r["probe_dice"] for r in records if "probe_dice" in r}
    assert sorted(probed) == [1, 2, 3]
    assert all(0.0 <= d <= 1.0 for d in probed.values())
    assert (tmp_path / "progress.png").is_file()


def test_cli_rejects_a_probe_without_labels(tmp_path, capsys):
    (tmp_path / "notadataset").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["-i", str(tmp_path), "-o", str(tmp_path / "run"), "--probe", str(tmp_path / "notadataset")])
    assert e.value.code == 2
    assert "dataset.json" in capsys.readouterr().err
