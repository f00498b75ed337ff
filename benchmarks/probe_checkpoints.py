"""Linear-probe Dice of frozen encoders: pre-trained checkpoints against randomly initialised ones (issue 10, point 5).

Fine-tuning mixes two questions: do the pre-trained features carry organ information, and does the recipe keep
it. This script answers the first alone. For every checkpoint (``LABEL=PATH``) and for ``--random`` randomly
initialised encoders of the first checkpoint's config (seeds 0, 1, ...), it fits the pre-training probe
(:class:`mim_nnunet.pretrain.probe.LinearProbe`: softmax regression on the four frozen encoder maps at sampled
voxels) on the first ``--cases`` labeled cases of a dataset and scores mean foreground Dice on the next
``--cases``, once per voxel-sampling seed (``--probe-seeds``). Same crops, spacing and window for every encoder
(the first checkpoint's).

    python benchmarks/probe_checkpoints.py --dataset work_dirs/study/nnUNet_raw/Dataset961_MiMStudy \\
        MiM=work_dirs/study/pretrain/MiM/checkpoint_final.safetensors \\
        MAE=work_dirs/study/pretrain/MAE/checkpoint_final.safetensors --random 3 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim_nnunet import load_encoder  # noqa: E402
from mim_nnunet.checkpoint import read_metadata  # noqa: E402
from mim_nnunet.model.config import MiMConfig  # noqa: E402
from mim_nnunet.model.encoder import HybridEncoder  # noqa: E402
from mim_nnunet.pretrain.probe import LinearProbe  # noqa: E402


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected LABEL=PATH")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such checkpoint")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=_labelled, help="LABEL=PATH of a MiM checkpoint")
    p.add_argument("--dataset", required=True, help="labeled nnU-Net raw dataset (id, name or folder)")
    p.add_argument("--cases", type=int, default=5, help="cases to fit, and as many held-out cases to score")
    p.add_argument("--random", type=int, default=3, help="randomly initialised encoders (seeds 0..N-1)")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2], help="voxel-sampling seeds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    md = read_metadata(a.checkpoints[0][1])
    encoders: list[tuple[str, str, object]] = [("checkpoint", label, path) for label, path in a.checkpoints]
    encoders += [("random", f"random init (seed {s})", s) for s in range(a.random)]

    probes = {}
    for seed in a.probe_seeds:
        probes[seed] = LinearProbe.from_dataset(a.dataset, a.cases, md.crop_size, md.spacing, md.intensity_window,
                                                seed=seed)  # fmt: skip
    rows = []
    for kind, label, src in encoders:
        if kind == "checkpoint":
            enc = load_encoder(src)
        else:
            torch.manual_seed(src)
            kwargs = MiMConfig.from_dict(md.config).encoder_kwargs() | {"grad_checkpointing": False}
            enc = HybridEncoder(**kwargs).eval()
        t0 = time.perf_counter()
        dice = [probes[s](enc, torch.device("cpu"))["probe_dice"] for s in a.probe_seeds]
        rows.append({"encoder": label, "kind": kind, "source": str(src), "probe_dice": dice,
                     "mean": float(np.mean(dice)), "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"{label}: probe Dice {np.mean(dice):.3f} ({', '.join(f'{d:.3f}' for d in dice)})", flush=True)

    print("\n| encoder | probe Dice mean | per voxel-sampling seed |\n|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['mean']:.3f} | {' / '.join(f'{d:.3f}' for d in r['probe_dice'])} |")
    if a.out:
        a.out.write_text(json.dumps({"dataset": str(a.dataset), "cases": a.cases, "probe_seeds": a.probe_seeds,
                                     "machine": platform.processor() or platform.machine(), "rows": rows},
                                    indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
