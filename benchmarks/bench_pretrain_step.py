"""One MiM pre-training step (forward + backward + AdamW) per preset: batched levels vs level-by-level.

Each measurement runs in its own subprocess so that its peak RSS (VmHWM) is its own. Both modes use the same
weights (same seed) and the same masks; the level-by-level mode makes one encoder and one decoder call per
level, as the authors' code does. Figures are per step of ``--batch`` samples of (2S)^3 crops.

    python benchmarks/bench_pretrain_step.py --presets tiny small base --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def run_one(preset: str, batched: bool, steps: int, batch: int, checkpointing: bool, threads: int, chunk: int) -> dict:
    import torch

    import mim_nnunet as mim

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mim.build_pretraining_model(preset, batch_levels=batched, grad_checkpointing=checkpointing, checkpoint_chunk=chunk)
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
    # the first step pays for allocations: report the median of the rest when there is a rest
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"preset": preset, "batched": batched, "checkpointing": checkpointing, "batch": batch,
            "step_s": steady, "first_step_s": times[0], "peak_rss_gb": peak_rss_gb(), "loss": float(out.loss)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--steps", type=int, default=3, help="steps per measurement (the first is a warm-up)")
    p.add_argument("--batch", type=int, default=1, help="samples (crops of 2S) per step")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing; auto = on for base only")
    p.add_argument("--chunk", type=int, default=4, help="volumes per checkpointed conv call (with checkpointing)")
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
        pair = {}
        for batched in (True, False):
            spec = dict(preset=preset, batched=batched, steps=steps, batch=args.batch, checkpointing=ckpt, threads=args.threads, chunk=args.chunk)
            res = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True, encoding="utf-8", errors="replace")
            if res.returncode:
                sys.exit(f"measurement {spec} failed:\n{res.stderr[-3000:]}")
            pair[batched] = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(pair[batched])
            r = pair[batched]
            print(f"{preset:5s} {'batched' if batched else 'level-by-level':14s} ckpt={ckpt!s:5s} chunk={args.chunk} "
                  f"step {r['step_s']:.2f} s (first {r['first_step_s']:.2f} s)  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        print(f"{preset:5s} ratio batched / level-by-level: time {pair[True]['step_s'] / pair[False]['step_s']:.2f}, "
              f"peak RSS {pair[True]['peak_rss_gb'] / pair[False]['peak_rss_gb']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
