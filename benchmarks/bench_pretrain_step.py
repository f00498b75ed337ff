"""One MiM pre-training step (forward + backward + AdamW) per preset, in four executions of the same weights.

    python benchmarks/bench_pretrain_step.py --presets tiny small base --steps 3

Executions (rows), all with the same weights (same seed) and the same masks:

- ``level-by-level dense``: one encoder and one decoder call per level, conv stages computed on every voxel,
  masked ones included: the authors' execution, the reference of every ratio;
- ``batched dense``: every volume of every level in one encoder and one decoder call;
- ``level-by-level packed``: one call per level, visible voxels and tokens only (``mim_nnunet/model/packed.py``);
- ``batched packed``: both; the default of ``build_pretraining_model``.

Each measurement runs in its own subprocess so that its peak RSS (VmHWM) is its own. Figures are per step of
``--batch`` samples of (2S)^3 crops; the step time is the median of the steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = [  # (batched, packed, label); the first is the reference
    (False, False, "level-by-level dense"),
    (True, False, "batched dense"),
    (False, True, "level-by-level packed"),
    (True, True, "batched packed"),
]


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def run_one(preset: str, batched: bool, packed: bool, steps: int, batch: int, checkpointing: bool, threads: int,
            chunk: int) -> dict:
    import torch

    import mim_nnunet as mim

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mim.build_pretraining_model(preset, batch_levels=batched, packed=packed, grad_checkpointing=checkpointing,
                                        checkpoint_chunk=chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    crops = torch.rand(batch, 1, model.crop_size, model.crop_size, model.crop_size, generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        out = model(crops, generator=torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"preset": preset, "batched": batched, "packed": packed, "checkpointing": checkpointing, "batch": batch,
            "step_s": steady, "first_step_s": times[0], "peak_rss_gb": peak_rss_gb(), "loss": float(out.loss)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--steps", type=int, default=3, help="steps per measurement (the first is a warm-up); base: 2")
    p.add_argument("--batch", type=int, default=1, help="samples (crops of 2S) per step")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing; auto = on for base only")
    p.add_argument("--chunk", type=int, default=4, help="volumes per checkpointed dense conv call (with checkpointing)")
    p.add_argument("--modes", nargs="+", default=[m[2] for m in MODES], choices=[m[2] for m in MODES], metavar="MODE",
                   help="subset of executions to run (default: all four)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(run_one(**json.loads(args._child))))
        return
    rows = []
    for preset in args.presets:
        ckpt = args.checkpointing == "on" or (args.checkpointing == "auto" and preset == "base")
        steps = 2 if preset == "base" else args.steps
        ref = None
        for batched, packed, label in MODES:
            if label not in args.modes:
                continue
            spec = dict(preset=preset, batched=batched, packed=packed, steps=steps, batch=args.batch, checkpointing=ckpt,
                        threads=args.threads, chunk=args.chunk)
            res = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True,
                                 encoding="utf-8", errors="replace")
            if res.returncode:
                sys.exit(f"measurement {spec} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["mode"] = label
            ref = ref or r
            r["time_ratio"] = r["step_s"] / ref["step_s"]
            r["rss_ratio"] = r["peak_rss_gb"] / ref["peak_rss_gb"]
            rows.append(r)
            print(f"{preset:5s} {label:22s} ckpt={ckpt!s:5s} step {r['step_s']:7.2f} s (first {r['first_step_s']:.2f} s)  "
                  f"peak RSS {r['peak_rss_gb']:5.2f} GB  vs {ref['mode']}: time x{r['time_ratio']:.2f}, "
                  f"RSS x{r['rss_ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
