"""Pictures of a run: previews de-normalise norm-pix predictions correctly; the PNGs are written."""

from __future__ import annotations

import torch

import mim_nnunet
from mim_nnunet.losses import patchify
from mim_nnunet.plots import plot_progress, reconstruction_views, save_previews


def test_perfect_norm_pix_prediction_reconstructs_the_input():
    torch.manual_seed(0)
    x = torch.rand(1, 32, 32, 32)
    mask = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 1])
    target = patchify(x[None])[0]
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    views = reconstruction_views(x, mask, normed, norm_pix=True)
    torch.testing.assert_close(views["reconstruction"], x[0], atol=1e-5, rtol=1e-5)
    nan = torch.isnan(patchify(views["masked input"][None, None])[0]).all(-1)
    assert torch.equal(nan, mask.bool())
    # Without de-normalisation the masked patches would not match: the test can fail.
    raw = reconstruction_views(x, mask, normed, norm_pix=False)["reconstruction"]
    assert not torch.allclose(raw, x[0], atol=1e-2)


def test_progress_and_previews_are_written(tmp_path):
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "rec1": 1.0, "rec2": 1.0, "rec3": 0.9, "align12": 1.5,
                "align23": 1.4, "lr": 1e-3 * s} for s in range(1, 5)]  # fmt: skip
    plot_progress(records, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.manual_seed(0)
    model = mim_nnunet.build_pretraining_model("tiny").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0))
    paths = save_previews(out, tmp_path / "previews", step=7)
    assert [p.name for p in paths] == [f"step_00007_level{n}.png" for n in (1, 2, 3)]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not list((tmp_path / "previews").glob(".*"))  # no temporary file left
