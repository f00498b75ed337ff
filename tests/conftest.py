"""Shared pytest fixtures. Keep them generic (other test modules add their own); data is generated, never stored."""

from __future__ import annotations

import pytest


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
