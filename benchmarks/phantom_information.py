"""How much of MiM's reconstruction target on the phantoms is learnable at all (issue 10, point 5)?

The norm-pix target of a masked token is its voxels normalised by the token's own mean and variance. On the
phantoms, much of that variance is the generator's white noise, which no context can predict. This script
generates each phantom twice from one seed, with its noise and without (``make_phantom(noise_hu=0)``: same
geometry, textures and HU), preprocesses both identically (the pre-training path: body crop from the noisy image,
HU window, resampling to 1.5 mm with order 3), cuts the same random crops, builds the same Mask-in-Mask levels
(one generator seed for both) and scores the ideal predictor, which knows the noise-free volume exactly:

    floor = mean over masked tokens of mean over voxels of ((noisy - clean) / sqrt(var_token(noisy) + eps))^2

i.e. the norm-pix loss that remains when everything but the noise is predicted (1.0 = a token that is pure noise;
predicting the token mean scores about 1.0 on every token). Compare with the losses a run reached
(``--metrics``: mean of the last 200 logged steps of its metrics.jsonl).

    python benchmarks/phantom_information.py --cases 12 --crops 8 \\
        --metrics MiM=work_dirs/study/pretrain/MiM/metrics.jsonl MAE=work_dirs/study/pretrain/MAE/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim_nnunet import build_pretraining_model  # noqa: E402
from mim_nnunet.data.phantoms import make_phantom  # noqa: E402
from mim_nnunet.data.preprocess import (  # noqa: E402
    PreprocessSettings,
    body_bbox,
    body_mask,
    read_case,
    window_and_resample,
)
from mim_nnunet.data.sources import CaseSource  # noqa: E402
from mim_nnunet.losses import patchify  # noqa: E402

EPS = 1e-6  # reconstruction_loss's


def noisy_and_clean(seed: int, settings: PreprocessSettings, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """The phantom of ``seed`` with and without noise, both preprocessed like pre-training, in [0, 1]."""
    arrays, props = [], None
    for name, noise in (("noisy", None), ("clean", 0.0)):
        image, _ = make_phantom(seed, labels=False, noise_hu=noise)
        path = tmp / f"{name}_{seed}.nii.gz"
        sitk.WriteImage(image, str(path))
        arr, props = read_case(CaseSource(case_id=path.name, path=str(path)), settings)
        arrays.append(arr)
    mask, strides = body_mask(arrays[0], settings)
    box = tuple(
        slice(lo, hi) for lo, hi in body_bbox(mask, strides, arrays[0].shape, props["spacing"], settings.crop_margin_mm)
    )
    noisy, clean = (window_and_resample(a[box], props["spacing"], settings).astype(np.float32) for a in arrays)
    return noisy, clean


def random_crops(a: np.ndarray, b: np.ndarray, size: int, n: int, rng: np.random.Generator):
    """``n`` crops of ``size^3`` at the same random places of ``a`` and ``b`` (zero = air padding if smaller)."""
    pad = [(0, max(0, size - s)) for s in a.shape]
    a, b = np.pad(a, pad), np.pad(b, pad)
    for _ in range(n):
        o = [int(rng.integers(0, s - size + 1)) for s in a.shape]
        sl = tuple(slice(x, x + size) for x in o)
        yield a[sl], b[sl]


def level_floors(model, noisy: torch.Tensor, clean: torch.Tensor, seed: int) -> list[tuple[float, float]]:
    """Per level: (floor summed over masked tokens, masked-token count), on the same masks for both inputs."""
    lv_n = model.make_levels(noisy, torch.Generator().manual_seed(seed))
    lv_c = model.make_levels(clean, torch.Generator().manual_seed(seed))
    out = []
    for n, c in zip(lv_n, lv_c, strict=True):
        assert torch.equal(n.masks, c.masks)
        tn, tc = patchify(n.inputs).double(), patchify(c.inputs).double()
        var = tn.var(dim=-1, keepdim=True)
        per_token = (((tn - tc) / (var + EPS) ** 0.5) ** 2).mean(dim=-1)
        out.append((float((per_token * n.masks).sum()), float(n.masks.sum())))
    return out


def achieved(metrics: Path, last: int = 200) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "rec1" in r][-last:]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("rec1", "rec2", "rec3") if k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=12, help="phantoms (seeds 10000, 10001, ...: not the corpus')")
    p.add_argument("--crops", type=int, default=8, help="random crops per phantom")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--spacing", type=float, default=1.5)
    p.add_argument("--metrics", nargs="*", default=[], help="LABEL=metrics.jsonl of pre-training runs to compare")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model = build_pretraining_model(a.preset)
    settings = PreprocessSettings(spacing=(a.spacing,) * 3, window=(-1000.0, 1000.0))
    rng = np.random.default_rng(0)
    sums = np.zeros((model.config.levels, 2))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.cases):
            noisy, clean = noisy_and_clean(10_000 + i, settings, Path(tmp))
            for j, (cn, cc) in enumerate(random_crops(noisy, clean, model.crop_size, a.crops, rng)):
                floors = level_floors(model, torch.from_numpy(cn)[None, None], torch.from_numpy(cc)[None, None],
                                      seed=1000 * i + j)  # fmt: skip
                sums += np.asarray(floors)
    floor = {f"rec{i + 1}": float(s / n) for i, (s, n) in enumerate(sums)}
    result = {"floor": floor, "cases": a.cases, "crops": a.crops, "preset": a.preset,
              "achieved": {}}  # fmt: skip
    for spec in a.metrics:
        label, _, path = spec.partition("=")
        result["achieved"][label] = achieved(Path(path))
    keys = list(floor)
    print("| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    print("| noise floor (ideal predictor) | " + " | ".join(f"{floor[k]:.3f}" for k in keys) + " |")
    for label, got in result["achieved"].items():
        print(f"| {label}, last 200 steps | " + " | ".join(f"{got[k]:.3f}" if k in got else "-" for k in keys) + " |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
