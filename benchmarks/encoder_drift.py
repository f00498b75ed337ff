"""How far fine-tuning moves a pre-trained encoder from its checkpoint (issue 10, point 5).

For each fine-tuned nnU-Net checkpoint (``checkpoint_final.pth`` of ``nnUNetTrainerMiM*``), prints per encoder
part the relative change ``||W_finetuned - W_pretrained|| / ||W_pretrained||`` over its weight matrices and
kernels (parameters with ndim >= 2; position tables and norms left out). A change near 1 means fine-tuning has
replaced what pre-training put there.

    python benchmarks/encoder_drift.py work_dirs/study/pretrain/MiM/checkpoint_final.safetensors \\
        work_dirs/study/runs/MiM_k2_s0/nnUNet_results/*/*/fold_0/checkpoint_final.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim_nnunet.checkpoint import load_checkpoint  # noqa: E402


def drift(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """``{part: relative change}`` for encoder parts (first two name components, e.g. ``blocks.0``)."""
    sums: dict[str, list[float]] = {}
    for name, w in finetuned.items():
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
        if not name.startswith("encoder."):
            continue
        key = name[len("encoder.") :]
        ref = pretrained.get(prefix + key)
        if ref is None or ref.shape != w.shape or w.ndim < 2 or key.startswith("pos_embed"):
            continue
        part = ".".join(key.split(".")[:2])
        s = sums.setdefault(part, [0.0, 0.0])
        s[0] += float((w.float() - ref.float()).pow(2).sum())
        s[1] += float(ref.float().pow(2).sum())
    if not sums:
        raise ValueError("no encoder weight of the fine-tuned checkpoint matches the pre-trained one")
    return {part: (d / max(n, 1e-30)) ** 0.5 for part, (d, n) in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrained", type=Path, help="the MiM checkpoint (.safetensors) fine-tuning started from")
    p.add_argument("finetuned", type=Path, nargs="+", help="nnU-Net checkpoint_final.pth files")
    a = p.parse_args(argv)
    state, md = load_checkpoint(a.pretrained)
    table = {}
    for f in a.finetuned:
        ck = torch.load(f, map_location="cpu", weights_only=False)  # nnU-Net's own checkpoint format
        table[str(f)] = drift(state, ck["network_weights"], md.encoder_prefix)
    parts = list(next(iter(table.values())))
    print("| checkpoint | " + " | ".join(parts) + " |\n|---|" + "---|" * len(parts))
    for f, d in table.items():
        print(f"| {f} | " + " | ".join(f"{d.get(q, float('nan')):.2f}" for q in parts) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
