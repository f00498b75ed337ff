"""``mim_nnunet_convert``: the MiM authors' released pre-training checkpoint -> a MiM checkpoint of this project.

    mim_nnunet_convert MiM_base.pth -o mim_base_converted.safetensors [--spacing Z Y X] [--window LO HI]

The source is read with ``torch.load(weights_only=True)`` allowing only ``argparse.Namespace``; names, axes
(x, y, z -> z, y, x), position-table token order and the conv-stage LayerNorm eps are converted
(mim_nnunet/convert.py, docs/finetuning.md). The result plans with ``mim_nnunet_plan_and_preprocess -pt``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mim_nnunet_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the authors' checkpoint (.pth, torch.save dict with 'model')")
    p.add_argument("-o", "--out", required=True, help="output MiM checkpoint (.safetensors)")
    p.add_argument("--spacing", nargs=3, type=float, default=[1.5, 1.5, 1.5], metavar=("Z", "Y", "X"),
                   help="spacing in mm recorded as the pre-training spacing, array order (z, y, x); the planner "
                        "resamples to it (default 1.5 1.5 1.5: the authors' fine-tuning spacing; they pre-trained "
                        "at native spacing)")
    p.add_argument("--window", nargs=2, type=float, default=[-1000.0, 1000.0], metavar=("LO", "HI"),
                   help="HU window mapped to [0, 1] (default -1000 1000: the authors' ScaleIntensityRange)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ..convert import convert

    try:
        md = convert(args.src, args.out, tuple(args.spacing), tuple(args.window))
    except CheckpointError as e:
        print(f"mim_nnunet_convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: preset {md.preset}, input {md.input_size}^3, conv LayerNorm eps "
          f"{md.config['conv_ln_eps']}, spacing {md.spacing} mm, window {md.intensity_window}, "
          f"source sha256 {md.corpus['source_sha256'][:12]}..., authors' epoch {md.corpus['authors_epoch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
