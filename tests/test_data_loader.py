"""CropDataset: shapes, range, determinism from (seed, epoch, index), padding of small volumes, DataLoader use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim_nnunet.data.cache import case_paths, read_volume
from mim_nnunet.data.loader import CropDataset, random_crop_box
from mim_nnunet.data.preprocess import preprocess_corpus


@pytest.fixture(scope="module")
def cache(phantom_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("crop_cache")
    preprocess_corpus([str(p) for p in phantom_corpus], out, num_workers=0, progress=False)
    return out


def test_shapes_range_and_content(cache):
    ds = CropDataset(cache, crop_size=16, seed=0)
    assert len(ds) == 3
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    # the crop is the stored volume's region, divided by the quantisation levels
    rng = np.random.default_rng([0, 0, 1])
    src, _ = random_crop_box(ds.shapes[1], 16, rng)
    vol = read_volume(case_paths(cache, ds.case_ids[1])[0])
    assert torch.equal(ds[1][0], torch.from_numpy(vol[src].astype(np.float32) / np.float32(ds.levels[1])))


def test_deterministic_per_seed_epoch_index(cache):
    a, b = CropDataset(cache, 24, seed=3), CropDataset(cache, 24, seed=3)
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    first = [a[i] for i in range(len(a))]
    a.set_epoch(1)
    assert not all(torch.equal(first[i], a[i]) for i in range(len(a)))
    a.set_epoch(0)
    assert all(torch.equal(first[i], a[i]) for i in range(len(a)))  # resumable: epoch 0 again is the same
    c = CropDataset(cache, 24, seed=4)
    assert not all(torch.equal(first[i], c[i]) for i in range(len(c)))
    assert torch.equal(a[2], b[2])  # independent of the order of access


def test_small_volume_padded_with_air(cache):
    ds = CropDataset(cache, crop_size=128, seed=0)
    shape = ds.shapes[0]
    assert max(shape) < 128
    x = ds[0][0]
    vol = read_volume(case_paths(cache, ds.case_ids[0])[0]).astype(np.float32) / ds.levels[0]
    assert x.shape == (128, 128, 128)
    assert float(x.sum()) == pytest.approx(
        float(vol.sum()), rel=1e-5
    )  # whole volume inside, the rest is 0 = air
    nz = torch.nonzero(x > 0.25)
    assert all(int(nz[:, a].max() - nz[:, a].min()) < shape[a] for a in range(3))
    # one axis shorter than the crop, another longer: both handled in one crop
    src, dst = random_crop_box((10, 200, 64), 64, np.random.default_rng(0))
    assert src[0] == slice(0, 10) and dst[0].stop - dst[0].start == 10 and src[1].stop - src[1].start == 64
    assert src[2] == slice(0, 64) and dst[2] == slice(0, 64)


def test_dataloader_workers_match_in_process(cache):
    ds = CropDataset(cache, 16, seed=1)
    ds.set_epoch(2)
    serial = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    parallel = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))
    assert serial.shape == (3, 1, 16, 16, 16) and torch.equal(serial, parallel)


def test_empty_or_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preprocessed cache"):
        CropDataset(tmp_path, 16)
