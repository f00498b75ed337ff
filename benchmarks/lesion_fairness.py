"""Is each phantom lesion a fair test? Per lesion type and size bin: CNR against the host organ's parenchyma and
the best single-HU-interval Dice, over the whole image and within the host organ.

Measures ``--cases`` phantoms of the labeled dataset's training stream (default geometry, the organ phantoms of
``write_nnunet_dataset``) each carrying the most lesions a tumour task draws (4 liver lesions, 3 kidney masses:
more lesions per case, the same lesions as the tasks' first ones) with
:func:`mim_nnunet.data.phantoms.lesion_report`, and prints a markdown table (docs/tumours.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mim_nnunet.data.phantoms import (
    DISEASES,
    LESION_SIZE_BINS_MM,
    _stream_seed,
    lesion_report,
    make_phantom,
    size_bin,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402 -- benchmarks/machine.py, also when loaded by path

TYPES = ("liver lesion, hypo", "liver lesion, hyper", "kidney tumour", "kidney cyst")


def measure(cases: int, seed: int) -> tuple[list[dict], list[float]]:
    """Every lesion's row of :func:`lesion_report` (with its case), and the seconds per case."""
    lesions = {name: d.max_lesions for name, d in DISEASES.items()}
    rows, seconds = [], []
    for i in range(cases):
        t0 = time.perf_counter()
        image, label = make_phantom(_stream_seed(seed, 1, i), lesions=lesions)
        rows += [r | {"case": i} for r in lesion_report(image, label)]
        seconds.append(time.perf_counter() - t0)
    return rows, seconds


def table(rows: list[dict]) -> str:
    bins = [size_bin(d) for d in (0.0, *LESION_SIZE_BINS_MM)]
    out = [
        "| lesion | size | n | CNR mean | CNR min | threshold Dice mean | max | in-organ threshold Dice mean | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in TYPES:
        for b in [*bins, "all"]:
            rs = [r for r in rows if r["type"] == kind and (b == "all" or size_bin(r["diameter_mm"]) == b)]
            if not rs:
                out.append(f"| {kind} | {b} | 0 | - | - | - | - | - | - |")
                continue
            cnr, thr, org = (
                np.array([r[k] for r in rs]) for k in ("cnr", "threshold_dice", "organ_threshold_dice")
            )
            out.append(
                f"| {kind} | {b} | {len(rs)} | {cnr.mean():.2f} | {cnr.min():.2f} | {thr.mean():.3f} | "
                f"{thr.max():.3f} | {org.mean():.3f} | {org.max():.3f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=20, help="phantoms to measure (default 20)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    a = p.parse_args(argv)
    rows, seconds = measure(a.cases, a.seed)
    print(
        f"{a.cases} phantoms, {len(rows)} lesions, {np.mean(seconds):.2f} s per case (generation + report, "
        f"max {np.max(seconds):.2f} s), {cpu_model()}\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
