"""Data-layer throughput: preprocessing (cases/s, cache size vs input size) and random-crop loading (crops/s with
0/1/2 DataLoader workers) against the MiM model's training step rate (forward + backward + AdamW, batch 2, fp32,
CPU) for the ``tiny`` and ``small`` presets, in one run. Targets: cache <= 1x the input; loader >= 2x the step.

    python benchmarks/bench_data.py                       # 12 default phantoms, tiny + small
    python benchmarks/bench_data.py --cases 6 --presets tiny --model-steps 2

The loader and the model are timed one after the other, not concurrently: on a machine with few cores the
loader's workers would share the cores with the training step.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def bench_preprocessing(corpus: Path, work: Path, workers: list[int]) -> dict:
    from mim_nnunet.data.preprocess import preprocess_corpus

    out = {}
    for w in workers:
        t0 = time.perf_counter()
        report = preprocess_corpus([str(corpus)], work / f"cache_w{w}", num_workers=w, progress=False)
        dt = time.perf_counter() - t0
        n = len(report.cases)
        out[w] = {"cases": n, "seconds": dt, "cases_per_s": n / dt, "bytes": report.fingerprint["bytes"]}
        print(
            f"preprocess  workers={w}: {n} cases in {dt:6.1f} s = {n / dt:5.2f} cases/s"
            f"  (cache {report.fingerprint['bytes']['cache'] / 2**20:.1f} MiB / input "
            f"{report.fingerprint['bytes']['raw'] / 2**20:.1f} MiB = {report.fingerprint['bytes']['cache_over_raw']:.2f}x)"
        )
    return out


def bench_loader(cache: Path, crop: int, workers: int, batches: int, batch_size: int = 2) -> float:
    """Steady-state crops/s (the first batch, which pays for worker start-up, is not timed)."""
    import torch

    from mim_nnunet.data.loader import CropDataset

    ds = CropDataset(cache, crop, seed=0)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    seen, t0, first = 0, None, True
    epoch = 0
    while seen < batches:
        ds.set_epoch(epoch)
        for x in dl:
            if first:
                first, t0 = False, time.perf_counter()
                continue
            assert x.shape == (batch_size, 1, crop, crop, crop)
            seen += 1
            if seen >= batches:
                break
        epoch += 1
    return seen * batch_size / (time.perf_counter() - t0)


def bench_model_step(preset: str, steps: int, batch_size: int = 2) -> tuple[float, int]:
    """Seconds per training step (after one untimed warm-up step) and the model's crop size."""
    import torch

    from mim_nnunet import build_pretraining_model

    torch.manual_seed(0)
    model = build_pretraining_model(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    crops = torch.rand(batch_size, 1, model.crop_size, model.crop_size, model.crop_size)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(crops, generator=torch.Generator().manual_seed(i))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), model.crop_size


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=12, help="phantoms to generate (default 12)")
    p.add_argument("--corpus", type=Path, default=None, help="use this folder of CT instead of phantoms")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preprocess-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--loader-batches", type=int, default=30, help="timed batches of 2 per loader setting")
    p.add_argument("--model-steps", type=int, default=3, help="timed steps per preset (after 1 warm-up)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from mim_nnunet.data.phantoms import write_unlabeled_corpus

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        corpus = a.corpus
        if corpus is None:
            t0 = time.perf_counter()
            write_unlabeled_corpus(work / "corpus", a.cases, seed=0)
            corpus = work / "corpus"
            print(
                f"generated {a.cases} phantoms in {time.perf_counter() - t0:.1f} s (not part of the figures)"
            )
        results["preprocess"] = bench_preprocessing(corpus, work, a.preprocess_workers)
        cache = work / f"cache_w{a.preprocess_workers[0]}"
        results["presets"] = {}
        for preset in a.presets:
            step_s, crop = bench_model_step(preset, a.model_steps)
            model_rate = 2 / step_s
            print(
                f"model {preset:5s}: crop {crop}^3, batch 2: {step_s:6.2f} s/step = {model_rate:6.2f} crops/s"
            )
            row = {"crop": crop, "step_s": step_s, "model_crops_per_s": model_rate, "loader": {}}
            for w in a.loader_workers:
                rate = bench_loader(cache, crop, w, a.loader_batches)
                row["loader"][w] = {"crops_per_s": rate, "ratio_to_step": rate / model_rate}
                print(f"  loader workers={w}: {rate:8.1f} crops/s = {rate / model_rate:8.1f}x the step rate")
            results["presets"][preset] = row
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
