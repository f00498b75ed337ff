"""Shared pytest fixtures. Keep them generic (other test modules add their own); data is generated, never stored."""

from __future__ import annotations

import pytest
from benchmark_helpers import load_benchmark


@pytest.fixture(scope="session")
def phantom_corpus(tmp_path_factory):
    """Three small unlabeled phantoms (NIfTI, varied spacing and orientation); returns their paths."""
    import SimpleITK as sitk

    from mim_nnunet.data.phantoms import make_phantom

    out = tmp_path_factory.mktemp("phantom_corpus")
    paths = []
    for i in range(3):
        image, _ = make_phantom(
            100 + i, shape_mm=(80.0, 72.0, 64.0), spacing=(1.6, 1.6, 2.0 + 0.5 * i), labels=False
        )
        p = out / f"case_{i}.nii.gz"
        sitk.WriteImage(image, str(p), useCompression=True)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """A tiny labeled nnU-Net raw dataset (id 990, 2 training + 1 test case); returns its folder."""
    from mim_nnunet.data.phantoms import write_nnunet_dataset

    raw = tmp_path_factory.mktemp("nnUNet_raw")
    return write_nnunet_dataset(
        raw, 990, "MiMPhantom", n_train=2, n_test=1, seed=0, shape_mm=(80.0, 72.0, 64.0)
    )




@pytest.fixture(scope="session")
def quick_study_stages(tmp_path_factory):
    """The organ study's ``--quick`` data, pre-training and planning stages
    (benchmarks/study_label_efficiency.py), run once for the session: about a minute of pre-training and
    planning that the seeding tests and both ``--quick`` study tests would otherwise each redo. The seeding tests
    read the folder; the study tests copy it (the organ study all of it, the tumour study its corpus and
    pre-training) and resume from the copy, so nothing a test writes reaches another. Returns the folder."""
    mod = load_benchmark("study_label_efficiency")
    study = mod.Study(tmp_path_factory.mktemp("quick_study_stages"), mod.Settings(**mod.QUICK))
    study.data()
    study.pretrain()
    study.plan()
    return study.out
