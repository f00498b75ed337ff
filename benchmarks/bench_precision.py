"""Time one MiM pre-training step on CPU in fp32 and under bf16 autocast, in one run, and print the ratio.

The result decides the CPU default of ``mim_nnunet_pretrain --precision auto`` (mim_method.md §8 measured bf16
*slower* than fp32 for ``base`` on a 2-core AVX-512/AMX CPU). Each precision runs in its own subprocess, so the
peak RSS printed is that precision's alone. Every subprocess does ``--warmup`` untimed steps first (oneDNN builds
its 3D-conv kernels on the first call, which is much slower) and then times ``--steps`` steps.

    python benchmarks/bench_precision.py                 # small preset, batch 1, 1 warm-up + 1 timed step
    python benchmarks/bench_precision.py --preset tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_precision(
    preset: str, precision: str, batch_size: int, warmup: int, steps: int, threads: int | None
) -> dict:
    import torch

    from mim_nnunet import build_pretraining_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_pretraining_model(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    crops = torch.rand(batch_size, 1, model.crop_size, model.crop_size, model.crop_size)
    times = []
    for i in range(warmup + steps):
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(crops, generator=gen)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {
        "precision": precision,
        "step_s": sum(times) / len(times),
        "peak_rss_gib": peak_gib,
        "loss": float(out.loss.detach()),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--batch-size", type=int, default=1, help="crops per step (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per precision (default 1)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per precision (default 1)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--child", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(one_precision(a.preset, a.child, a.batch_size, a.warmup, a.steps, a.threads)))
        return
    results = {}
    for precision in ("fp32", "bf16"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            precision,
            "--preset",
            a.preset,
            "--batch-size",
            str(a.batch_size),
            "--warmup",
            str(a.warmup),
            "--steps",
            str(a.steps),
        ] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, encoding="utf-8", errors="replace").stdout
        results[precision] = json.loads(out.strip().splitlines()[-1])
        r = results[precision]
        print(
            f"{a.preset} batch {a.batch_size} {precision:>4}: {r['step_s']:.2f} s/step, peak RSS {r['peak_rss_gib']:.2f} GiB, "
            f"loss {r['loss']:.4f}, {r['threads']} threads",
            flush=True,
        )
    ratio = results["bf16"]["step_s"] / results["fp32"]["step_s"]
    verdict = "faster" if ratio < 1 else "slower"
    print(f"bf16 / fp32 step time = {ratio:.2f} (bf16 autocast is {verdict} on this CPU)")


if __name__ == "__main__":
    main()
