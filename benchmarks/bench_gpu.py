"""GPU figures in one prepared run (issue 10, point 6): pre-training throughput, memory and FLOP utilisation, and
fine-tuning iteration time against stock nnU-Net's network.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json             # one GPU, base preset, 192^3 crops
    python benchmarks/bench_gpu.py --device cpu --preset tiny --steps 2 --warmup 1 --ft-patch 32   # CPU smoke run

Pre-training (one optimizer step = forward + backward + AdamW on ``--batch`` crops of (2S)^3, 1 + 4 + 16 volumes
of S^3 each), for each precision (bf16 and fp16 autocast; fp16 with loss scaling) and execution (``packed``: the
default, visible voxels only; ``dense``: the reference that computes masked voxels too, ``packed=False``):
samples/s (median step time of ``--steps`` steps after ``--warmup``), peak memory (CUDA: max allocated; CPU: the
process' peak RSS so far, so only the first row is clean), and the FLOPs of one step COUNTED by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention, forward and backward; elementwise
work is not counted). Two utilisations against the device's peak dense bf16 throughput:

- HFU (hardware): the executed FLOPs of that execution per second;
- MFU (model): the *packed* execution's FLOPs per second, i.e. only the arithmetic that the maths needs. Dense
  execution does more arithmetic for the same result, so its HFU flatters it; MFU compares the two fairly.

Fine-tuning (one nnU-Net iteration: forward, deep-supervision Dice + CE loss, backward, gradient clipping at 12,
optimizer step; no data loading) at an equal patch and batch: ``MiMSegmentationNetwork`` of the preset (AdamW, as
``nnUNetTrainerMiM``) against stock nnU-Net's ``PlainConvUNet`` built as nnU-Net's default planner builds it for
that patch at 1.5 mm isotropic spacing (``get_pool_and_conv_props``: 3^3 kernels, stride 2 until 4 voxels remain,
32 features doubling to 320, two convs per stage, instance norm, leaky ReLU; SGD Nesterov as nnUNetTrainer). On
CUDA both run under fp16 autocast with loss scaling, as nnU-Net trains; on CPU in fp32.

The peak throughput comes from :data:`PEAK_BF16_TFLOPS` (keyed by the CUDA device name) or ``--peak-tflops``.
The run stops starting new measurements after ``--budget-s`` seconds (default 540: the whole script must fit in
10 minutes of one GPU); what was skipped is recorded. A table is printed and everything goes to ``--out`` (JSON),
with the device name, torch / CUDA / cuDNN versions and the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("bench_gpu")

# Peak dense (no structured sparsity) BF16 tensor-core throughput in TFLOP/s, from NVIDIA's product pages and
# datasheets, which print the with-sparsity figure; dense is half of it. Matched as substrings of
# torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100", "A100" before "A10", "L40S" before
# "L4").
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("H200 NVL", 835.5, "nvidia.com/en-us/data-center/h200/: H200 NVL BF16 1,671 TFLOPS with sparsity"),
    ("H200", 989.5, "nvidia.com/en-us/data-center/h200/: H200 SXM BF16 1,979 TFLOPS with sparsity"),
    ("H100 NVL", 835.5, "nvidia.com/en-us/data-center/h100/: H100 NVL BF16 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.5, "nvidia.com/en-us/data-center/h100/: H100 PCIe BF16 1,513 TFLOPS with sparsity"),
    ("H100", 989.5, "nvidia.com/en-us/data-center/h100/: H100 SXM BF16 1,979 TFLOPS with sparsity"),
    ("GH200", 989.5, "nvidia.com/en-us/data-center/grace-hopper-superchip/: BF16 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)"),
    ("L40S", 362.05, "nvidia.com/en-us/data-center/l40s/: BF16 733 TFLOPS with sparsity (362.05 dense)"),
    ("L40", 181.05, "NVIDIA L40 datasheet: BF16 362.1 TFLOPS with sparsity"),
    ("L4", 121.0, "nvidia.com/en-us/data-center/l4/: BF16 242 TFLOPS with sparsity"),
    ("A10", 125.0, "NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity)"),
]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def lookup_peak(name: str) -> tuple[float | None, str]:
    """Peak dense bf16 TFLOP/s of a CUDA device name and where the number comes from."""
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, source
    return None, f"{name!r} is not in PEAK_BF16_TFLOPS: give --peak-tflops"


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no table entry for CPUs: give --peak-tflops"
    return lookup_peak(torch.cuda.get_device_name(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward + backward), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------------ pre-training



def measure(step, device: torch.device, args) -> tuple[list[float], float, float, int]:
    """Step times, their median, peak memory (GB) over the timed steps, and the counted FLOPs of one step."""
    reset_peak(device)
    times = time_steps(step, device, args.warmup, args.steps)
    peak = peak_memory_gb(device)
    return times, statistics.median(times), peak, count_flops(step)

def pretrain_case(args, device: torch.device, precision: str, packed: bool) -> dict:
    import mim_nnunet
    from mim_nnunet.pretrain.optim import build_optimizer

    torch.manual_seed(0)
    model = mim_nnunet.build_pretraining_model(
        args.preset, packed=packed, grad_checkpointing=args.grad_checkpointing
    ).to(device)
    model.train()
    opt = build_optimizer(model, 1e-4)
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    crop = model.crop_size
    coarse = torch.rand(args.batch, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    crops = F.interpolate(coarse, size=(crop,) * 3, mode="trilinear").to(device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(crops, generator=gen)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    times, median, peak, flops = measure(step, device, args)
    return {
        "precision": precision, "execution": "packed" if packed else "dense", "batch": args.batch,
        "crop": crop, "step_s": median, "samples_per_s": args.batch / median, "peak_memory_gb": peak,
        "flops_per_step": flops, "tflops_per_s": flops / median / 1e12, "times_s": times,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------- fine-tuning


def stock_nnunet_network(patch: list[int], num_classes: int, spacing: float = 1.5) -> torch.nn.Module:
    """nnU-Net's default 3d_fullres ``PlainConvUNet`` for ``patch`` (its planner's topology rule and widths)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pools, kernels, patch, _ = get_pool_and_conv_props([spacing] * 3, patch, 4, 999999)
    n = len(pools)
    return PlainConvUNet(
        input_channels=1, n_stages=n, features_per_stage=[min(320, 32 * 2**i) for i in range(n)],
        conv_op=torch.nn.Conv3d, kernel_sizes=kernels, strides=pools, n_conv_per_stage=[2] * n,
        num_classes=num_classes, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True,
    )  # fmt: skip


def mim_network(preset: str, patch: list[int], num_classes: int) -> torch.nn.Module:
    from mim_nnunet.model.config import make_config
    from mim_nnunet.model.segmentation import MiMSegmentationNetwork

    cfg = make_config(preset)
    return MiMSegmentationNetwork(
        1, num_classes, patch, dims=cfg.dims, conv_depths=cfg.conv_depths, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=0.1, deep_supervision=True,
    )  # fmt: skip


def finetune_case(args, device: torch.device, which: str) -> dict:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    patch, classes = list(args.ft_patch), args.ft_classes
    net = mim_network(args.preset, patch, classes) if which == "mim" else stock_nnunet_network(patch, classes)
    net = net.to(device).train()
    if which == "mim":  # nnUNetTrainerMiM: AdamW
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    else:  # nnUNetTrainer: SGD, Nesterov momentum 0.99
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    x = torch.rand(args.ft_batch, 1, *patch, device=device)
    full = torch.randint(0, classes, (args.ft_batch, 1, *patch), device=device).float()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        shapes = [o.shape[2:] for o in net(x)]
    targets = [F.interpolate(full, size=s, mode="nearest") for s in shapes]
    weights = torch.tensor([1 / 2**i for i in range(len(shapes))])
    weights[-1] = 0.0  # nnU-Net drops the lowest resolution
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=None,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),  # fmt: skip
        (weights / weights.sum()).tolist(),
    )

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(net(x), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    times, median, peak, flops = measure(step, device, args)
    return {
        "network": "MiMSegmentationNetwork (" + args.preset + ")" if which == "mim" else "nnU-Net PlainConvUNet",
        "patch": patch, "batch": args.ft_batch, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "iteration_s": median, "peak_memory_gb": peak, "flops_per_iteration": flops,
        "tflops_per_s": flops / median / 1e12, "times_s": times,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the run


def environment(device: torch.device, argv: list[str]) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "command": " ".join(["python", "benchmarks/bench_gpu.py", *argv]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if device.type == "cpu":
        try:
            model = [
                ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")
            ]
            env["device_name"] = model[0].split(":", 1)[1].strip() if model else env["device_name"]
        except OSError:
            pass
        env["threads"] = torch.get_num_threads()
    return env


def markdown(result: dict) -> str:
    peak = result["peak_bf16_tflops"]
    lines = [
        f"Device: {result['env']['device_name']}; torch {result['env']['torch']}, CUDA {result['env']['cuda']}; "
        f"peak dense bf16 {peak if peak is not None else 'unknown'} TFLOP/s ({result['peak_source']})",
        "",
        "| pre-training | samples/s | step s | peak mem GB | TFLOP/step (counted) | TFLOP/s | HFU | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["pretraining"]:
        if "skipped" in r:
            lines.append(f"| {r['precision']} {r['execution']} | skipped: {r['skipped']} | | | | | | |")
            continue
        hfu = f"{r['hfu']:.1%}" if r.get("hfu") is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['precision']} {r['execution']} | {r['samples_per_s']:.2f} | {r['step_s']:.3f} | "
            f"{r['peak_memory_gb']:.1f} | {r['flops_per_step'] / 1e12:.3g} | {r['tflops_per_s']:.3g} | {hfu} | {mfu} |"
        )
    lines += [
        "",
        "| fine-tuning | patch x batch | params M | iteration s | peak mem GB | TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["finetuning"]:
        if "skipped" in r:
            lines.append(f"| {r['network']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(
            f"| {r['network']} | {'x'.join(map(str, r['patch']))} x {r['batch']} | {r['params_m']:.1f} | "
            f"{r['iteration_s']:.3f} | {r['peak_memory_gb']:.1f} | {r['tflops_per_s']:.3g} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu; default cuda")
    p.add_argument("--preset", default="base", help="model preset (base: 192^3 crops); default base")
    p.add_argument("--batch", type=int, default=2, help="pre-training crops per step; default 2")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement; default 10")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing; default 3")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=list(PRECISIONS))
    p.add_argument("--executions", nargs="+", default=["packed", "dense"], choices=["packed", "dense"])
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="pre-train with activation checkpointing"
    )
    p.add_argument(
        "--ft-patch", type=int, nargs=3, default=[128, 128, 128], help="fine-tuning patch; default 128^3"
    )
    p.add_argument("--ft-batch", type=int, default=2, help="fine-tuning batch (nnU-Net's default 2)")
    p.add_argument(
        "--ft-classes", type=int, default=14, help="segmentation classes incl. background; default 14"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (overrides the table)"
    )
    p.add_argument(
        "--budget-s", type=float, default=540.0, help="start no new measurement after this; default 540"
    )
    p.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON output path")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {args.device}: CUDA is not available here; use --device cpu --preset tiny"
            )
        torch.backends.cudnn.benchmark = True  # as nnU-Net
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    peak, source = peak_tflops(device, args.peak_tflops)
    env = environment(device, sys.argv[1:] if argv is None else argv)
    result = {"env": env, "args": vars(args), "peak_bf16_tflops": peak, "peak_source": source,
              "pretraining": [], "finetuning": []}  # fmt: skip

    def over_budget() -> str | None:
        spent = time.perf_counter() - t0
        return f"budget of {args.budget_s:.0f} s spent ({spent:.0f} s)" if spent > args.budget_s else None

    for precision in args.precisions:
        for execution in args.executions:
            skip = over_budget()
            if skip:
                result["pretraining"].append(
                    {"precision": precision, "execution": execution, "skipped": skip}
                )
                continue
            log.info("pre-training %s %s ...", precision, execution)
            try:
                r = pretrain_case(args, device, precision, execution == "packed")
            except torch.OutOfMemoryError as e:
                r = {
                    "precision": precision,
                    "execution": execution,
                    "skipped": f"out of memory: {str(e)[:120]}",
                }
            result["pretraining"].append(r)
            log.info("  %s", {k: v for k, v in r.items() if k != "times_s"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model_flops = {r["precision"]: r["flops_per_step"] for r in result["pretraining"]
                   if r.get("execution") == "packed" and "flops_per_step" in r}  # fmt: skip
    for r in result["pretraining"]:
        if "step_s" in r and peak:
            r["hfu"] = r["tflops_per_s"] / peak
            useful = model_flops.get(r["precision"])
            r["mfu"] = useful / r["step_s"] / 1e12 / peak if useful else None
    for which in ("mim", "stock"):
        skip = over_budget()
        name = "MiMSegmentationNetwork" if which == "mim" else "nnU-Net PlainConvUNet"
        if skip:
            result["finetuning"].append({"network": name, "skipped": skip})
            continue
        log.info("fine-tuning %s ...", name)
        try:
            r = finetune_case(args, device, which)
        except torch.OutOfMemoryError as e:
            r = {"network": name, "skipped": f"out of memory: {str(e)[:120]}"}
        result["finetuning"].append(r)
        log.info("  %s", {k: v for k, v in r.items() if k != "times_s"})
    result["total_s"] = time.perf_counter() - t0
    table = markdown(result)
    print(table)
    result["table"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s (%.0f s in all)", out, result["total_s"])
    return result


if __name__ == "__main__":
    main()
