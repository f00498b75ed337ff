"""Fine-tuning cost of MiM vs the stock nnU-Net trainer, as ratios measured in one run on one machine (issue 4).

On the synthetic phantom dataset, for the stock ``nnUNetTrainer`` with default plans (its own patch and batch),
the stock network re-planned at the MiM patch (plans surgery: nnU-Net's topology rule for that patch), and the
MiM network of each requested preset at the MiM patch:
- training iteration time: nnU-Net's own ``train_step`` (forward, deep-supervision DC+CE loss, backward, clipping,
  optimiser step; no data loading) on random tensors, median of the timed iterations;
- peak memory: a fresh worker process's own peak RSS (``VmHWM``) minus its RSS at ``baseline_rss_gb`` (after
  the imports, before the network is built; CPU);
- inference time per case: ``nnUNetPredictor.predict_single_npy_array`` on the raw test cases (preprocessing,
  sliding window with step 0.5 and Gaussian weighting, resampling back), no mirroring for either.
Each measurement runs in its own process (clean peak RSS); stock and MiM alternate over ``--rounds`` and the
fastest round counts, so both see the same machine load. The MiM worker also reports the planner's memory-model
estimate next to the measured delta (the calibration of ``mim_nnunet.nnunet.memory``).

    python benchmarks/bench_finetune.py --presets tiny small --patch 64 64 64 --out benchmarks/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 990
NAME = "MiMPhantom"


def rss_gb() -> float:
    """Current RSS in GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    """Peak RSS of this process's own memory since it started, in GiB (Linux /proc: ``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the parent's high-water mark across fork and exec into it, so
    a worker started by a parent that had planned the dataset reported at least the parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB


def baseline_rss_gb() -> float:
    """RSS at the point every peak-memory delta starts from: after the imports, before the network is built.

    The first ``optimizer.step()`` imports ``torch._dynamo`` (``torch.optim.optimizer``), which nnU-Net's trainer
    module imports at the top: imported here, it is outside every delta, not only outside nnU-Net's.
    """
    import torch._dynamo  # noqa: F401

    return rss_gb()


def worker(spec: dict) -> dict:
    """One measurement (runs in a fresh process): train-step timing + peak memory, or inference per case."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mim_nnunet.nnunet.trainer import nnUNetTrainerMiM

    plans = json.loads(Path(spec["plans"]).read_text())
    plans["configurations"]["3d_fullres"] = spec["configuration"]
    dataset_json = json.loads(Path(spec["dataset_json"]).read_text())
    cls = nnUNetTrainerMiM if spec["trainer"] == "mim" else nnUNetTrainer
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    base_rss = baseline_rss_gb()
    torch.manual_seed(0)
    if spec["kind"] == "train":
        trainer = cls(
            dict(plans, continue_training=False), "3d_fullres", 0, dataset_json, device=torch.device("cpu")
        )
        trainer.num_input_channels = 1
        trainer.network = cls.build_network_architecture(pm, cm, 1, n_heads, True)
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        trainer.loss = trainer._build_loss()
        trainer.network.train()
        patch, batch = cm.patch_size, cm.batch_size
        scales = trainer._get_deep_supervision_scales()
        x = torch.rand(batch, 1, *patch)
        target = [
            torch.randint(0, n_heads, (batch, 1, *[round(p * s) for p, s in zip(patch, sc)])).float()
            for sc in scales
        ]
        times = []
        for i in range(spec["warmup"] + spec["iters"]):
            t = time.perf_counter()
            trainer.train_step({"data": x, "target": target})
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
        out = {
            "iteration_s": statistics.median(times),
            "iteration_times_s": times,
            "base_rss_gb": base_rss,
            "peak_rss_gb": peak_rss_gb(),
            "peak_delta_gb": peak_rss_gb() - base_rss,
            "patch_size": list(patch),
            "batch_size": batch,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
        }
        if spec["trainer"] == "mim":
            from mim_nnunet.nnunet.memory import MemoryModel

            mm = MemoryModel(cm.network_arch_init_kwargs, 1, n_heads)
            out["memory_model_gb"] = mm.estimate(patch, batch) / 2**30
            out["memory_model_activations_gb"] = batch * 4 * mm.activation_elements(patch) / 2**30
        return out
    network = cls.build_network_architecture(pm, cm, 1, n_heads, False).eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
        device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(network, pm, cm, [network.state_dict()], dataset_json, cls.__name__, None)
    times = []
    for case in spec["cases"]:
        img, props = SimpleITKIO().read_images([case])
        t = time.perf_counter()
        seg = predictor.predict_single_npy_array(img, props)
        times.append(time.perf_counter() - t)
        assert seg.shape == img.shape[1:]
    return {
        "inference_s_per_case": float(np.mean(times)),
        "inference_times_s": times,
        "patch_size": list(cm.patch_size),
    }


def stock_config_at_patch(default_cfg: dict, patch: list[int]) -> dict:
    """The default plans' 3d_fullres configuration re-planned for ``patch`` with nnU-Net's topology rule."""
    from copy import deepcopy

    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    cfg = deepcopy(default_cfg)
    _, pools, kernels, patch, _ = get_pool_and_conv_props(cfg["spacing"], patch, 4, 999999)
    n = len(pools)
    kw = cfg["architecture"]["arch_kwargs"]
    kw.update(
        n_stages=n, kernel_sizes=kernels, strides=pools, features_per_stage=[min(320, 32 * 2**i) for i in range(n)],
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1),
    )  # fmt: skip
    cfg["patch_size"] = [int(p) for p in patch]
    return cfg


def prepare(work: Path, presets: list[str], memory_gb: float) -> dict:
    """Dataset, fingerprint, default plans and one MiM plans file per preset (no preprocessing needed)."""
    os.environ.update(
        nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"), nnUNet_results=str(work / "res")
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )

    from mim_nnunet import build_pretraining_model
    from mim_nnunet.checkpoint import CheckpointMetadata, save_checkpoint
    from mim_nnunet.data.phantoms import write_nnunet_dataset
    from mim_nnunet.nnunet.planner import MiMPlanner

    folder = work / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"
    if not folder.is_dir():
        write_nnunet_dataset(work / "raw", DATASET_ID, NAME, n_train=8, n_test=2, seed=0)
    pre = work / "pre" / folder.name
    if not (pre / "dataset_fingerprint.json").is_file():
        extract_fingerprint_dataset(DATASET_ID, num_processes=2, clean=True, verbose=False)
    plan_experiment_dataset(DATASET_ID, ExperimentPlanner)
    mim_plans = {}
    for preset in presets:
        ckpt = work / f"{preset}.safetensors"
        if not ckpt.is_file():
            m = build_pretraining_model(preset)
            c = m.config
            md = CheckpointMetadata(
                preset=preset, config=c.to_dict(), spacing=[1.5] * 3, intensity_window=[-1000, 1000],
                input_size=c.input_size, crop_size=2 * c.input_size,
            )  # fmt: skip
            save_checkpoint(ckpt, m.state_dict(), md)
        plans_name = f"MiMPlans_{preset}"
        planner = __import__("functools").partial(MiMPlanner, checkpoint=ckpt)
        plan_experiment_dataset(
            DATASET_ID, planner, gpu_memory_target_in_gb=memory_gb, overwrite_plans_name=plans_name
        )
        mim_plans[preset] = pre / f"{plans_name}.json"
    return {
        "default_plans": pre / "nnUNetPlans.json",
        "mim_plans": mim_plans,
        "dataset_json": folder / "dataset.json",
        "cases": sorted(str(p) for p in (folder / "imagesTs").glob("*_0000.nii.gz")),
    }


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {spec['name']}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/mim_bench_finetune", help="scratch folder (dataset, plans)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--patch", nargs=3, type=int, default=None, help="force the MiM patch (multiples of 16)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--memory_gb", type=float, default=8.0, help="MiM planner memory target")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--skip_default", action="store_true", help="skip the stock trainer at its default-plans patch"
    )
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    work = Path(args.work)
    t0 = time.time()
    paths = prepare(work, args.presets, args.memory_gb)
    default_plans = json.loads(paths["default_plans"].read_text())
    default_cfg = default_plans["configurations"]["3d_fullres"]
    common = dict(
        dataset_json=str(paths["dataset_json"]), threads=args.threads, warmup=args.warmup, iters=args.iters
    )
    specs = []
    if not args.skip_default:
        specs.append(
            dict(
                name="stock_default_plans",
                trainer="stock",
                plans=str(paths["default_plans"]),
                configuration=default_cfg,
            )
        )
    for preset, plans_file in paths["mim_plans"].items():
        cfg = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]
        if args.patch:
            cfg["patch_size"] = list(args.patch)
            cfg["architecture"]["arch_kwargs"]["patch_size"] = list(args.patch)
        cfg["batch_size"] = args.batch
        stock = stock_config_at_patch(default_cfg, cfg["patch_size"])
        stock["batch_size"] = args.batch
        name = "x".join(map(str, cfg["patch_size"]))
        if not any(s["name"] == f"stock_at_{name}" for s in specs):
            specs.append(
                dict(
                    name=f"stock_at_{name}",
                    trainer="stock",
                    plans=str(paths["default_plans"]),
                    configuration=stock,
                )
            )
        specs.append(
            dict(name=f"mim_{preset}_at_{name}", trainer="mim", plans=str(plans_file), configuration=cfg)
        )

    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for spec in specs:
            for kind in ("train", "infer"):
                res = run_worker(dict(spec, **common, kind=kind, cases=paths["cases"]))
                print(
                    f"round {r} {spec['name']} {kind}: {json.dumps({k: v for k, v in res.items() if not k.endswith('times_s')})}",
                    flush=True,
                )
                key = "iteration_s" if kind == "train" else "inference_s_per_case"
                prev = results.setdefault(spec["name"], {})
                if key not in prev or res[key] < prev[key]:
                    prev.update(res)
    ref_default = results.get("stock_default_plans")
    ratios = {}
    for spec in specs:
        if spec["trainer"] != "mim":
            continue
        mim = results[spec["name"]]
        stock = results["stock_at_" + "x".join(map(str, spec["configuration"]["patch_size"]))]
        entry = {
            "iteration_time_vs_stock_equal_patch": mim["iteration_s"] / stock["iteration_s"],
            "peak_memory_vs_stock_equal_patch": mim["peak_delta_gb"] / stock["peak_delta_gb"],
            "inference_time_vs_stock_equal_patch": mim["inference_s_per_case"]
            / stock["inference_s_per_case"],
        }
        if ref_default:
            entry.update(
                iteration_time_vs_stock_default=mim["iteration_s"] / ref_default["iteration_s"],
                peak_memory_vs_stock_default=mim["peak_delta_gb"] / ref_default["peak_delta_gb"],
                inference_time_vs_stock_default=mim["inference_s_per_case"]
                / ref_default["inference_s_per_case"],
            )
        ratios[spec["name"]] = entry
    report = {
        "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {args.threads}",
        "load_average_at_end": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": results,
        "ratios": ratios,
        "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
