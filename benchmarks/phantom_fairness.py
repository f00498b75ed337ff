"""Is each phantom organ a fair test? Per organ: CNR against its surroundings and the best single-HU-interval Dice.

Measures ``--cases`` phantoms of the labeled dataset's training stream (default geometry, the one
``write_nnunet_dataset`` writes) with :func:`mim_nnunet.data.phantoms.organ_report` and prints a markdown table
(mean, min / max over cases). ``--generator FILE`` measures another version of ``phantoms.py`` (e.g. an older
commit: ``git show REV:mim_nnunet/data/phantoms.py > /tmp/old.py``) with the current measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np

from mim_nnunet.data.phantoms import _stream_seed, organ_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10, help="phantoms to measure (default 10)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--generator", default=None, help="a phantoms.py file to take make_phantom from")
    a = p.parse_args(argv)
    if a.generator:
        spec = importlib.util.spec_from_file_location("phantoms_under_test", a.generator)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        make_phantom = module.make_phantom
    else:
        from mim_nnunet.data.phantoms import make_phantom
    rows: dict[str, list[dict]] = {}
    seconds = []
    for i in range(a.cases):
        t0 = time.perf_counter()
        image, label = make_phantom(_stream_seed(a.seed, 1, i))
        seconds.append(time.perf_counter() - t0)
        for organ, r in organ_report(image, label).items():
            rows.setdefault(organ, []).append(r)
    print(f"{a.cases} phantoms, generation {np.mean(seconds):.2f} s per case (max {np.max(seconds):.2f} s)\n")
    print("| organ | CNR mean | CNR min | best-threshold Dice mean | max | volume (ml) |")
    print("|---|---|---|---|---|---|")
    for organ, rs in rows.items():
        cnr = np.array([r["cnr"] for r in rs])
        thr = np.array([r["threshold_dice"] for r in rs])
        vol = np.array([r["volume_ml"] for r in rs])
        print(
            f"| {organ} | {cnr.mean():.2f} | {cnr.min():.2f} | {thr.mean():.3f} | {thr.max():.3f} "
            f"| {vol.mean():.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
