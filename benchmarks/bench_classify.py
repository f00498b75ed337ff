"""Cost of the MiM classifier against nnUNetTrainerMiM's segmentation step at the same input size and batch.

On the synthetic phantom dataset (benchmarks/bench_finetune.py's ``prepare``: phantoms, fingerprint, MiM plans per
preset), each measurement in a fresh process (clean peak RSS), alternating over ``--rounds`` (the fastest counts):

- classifier training iteration: forward, cross-entropy, backward, clipping, AdamW step with layer-wise decay
  (what ``mim_nnunet_classify train`` runs per batch, no data loading), on random tensors; median time and peak
  memory (CPU: RSS, below; CUDA: peak allocated);
- nnUNetTrainerMiM's ``train_step`` at the same patch and batch (bench_finetune.py's worker, CPU): the same
  encoder plus the decoder, deep supervision and its DC+CE loss, also without data loading, same thread count;
- prediction per case: ``mim_nnunet_classify predict`` on the phantom test cases (reading, reorientation,
  resampling, windowing, forward) of a run trained for one epoch on the phantoms with made-up classes.

Peak RSS is reported both ways: the process's peak and the peak above its RSS at one baseline point, the same
for both steps (``bench_finetune.baseline_rss_gb``: after the imports, ``torch._dynamo`` included, before the
network is built). The delta is the step's cost (network, optimiser state, activations, kernels' workspace); the
absolute peak also holds what each process imported (nnU-Net's worker imports the trainer, the predictor and
their dependencies). Prints the figures with the CPU model (``lscpu``) and writes them as JSON.

    python benchmarks/bench_classify.py --presets tiny small --size 64 64 64 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_finetune  # noqa: E402 -- the phantom dataset, plans and the nnU-Net worker are shared
from machine import cpu_model  # noqa: E402


def classifier_step(spec: dict) -> dict:
    """Median training-step time and peak memory of the classifier (fresh process)."""
    import torch

    from mim_nnunet.classify.model import MiMClassifier
    from mim_nnunet.classify.plan import network_kwargs
    from mim_nnunet.model.config import make_config
    from mim_nnunet.nnunet.optim import param_groups_layer_decay

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    base = bench_finetune.baseline_rss_gb()
    kw = network_kwargs(make_config(spec["preset"]), 1, 0.1)
    torch.manual_seed(0)
    net = MiMClassifier(2, spec["size"], pooling=spec["pooling"], **kw).to(device).train()
    opt = torch.optim.AdamW(param_groups_layer_decay(net, 0.05, 0.75, kw["conv_depths"], kw["depth"]), lr=1e-4)
    x = torch.rand(spec["batch"], 1, *spec["size"], device=device)
    y = torch.randint(0, 2, (spec["batch"],), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    times = []
    for i in range(spec["warmup"] + spec["iters"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    out = {"iteration_s": statistics.median(times), "iteration_times_s": times, "input_shape": list(x.shape),
           "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in net.parameters())}  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = bench_finetune.peak_rss_gb()
        out.update(base_rss_gb=base, peak_rss_gb=peak, peak_delta_gb=peak - base)
    return out


def predict_per_case(spec: dict) -> dict:
    """One epoch of training on the phantoms (made-up classes), then the predict time per test case."""
    from mim_nnunet.classify.predict import predict
    from mim_nnunet.classify.train import PlanRequest, TrainOptions, train

    src, work = Path(spec["dataset"]), Path(spec["work"])
    ds = work / f"cls_{spec['preset']}"
    if not ds.is_dir():
        shutil.copytree(src, ds)
        info = json.loads((ds / "dataset.json").read_text())
        (ds / "dataset.json").write_text(json.dumps(info | {"classes": ["even", "odd"]}))
        cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds / "imagesTr").glob("*_0000.nii.gz"))
        (ds / "classesTr.csv").write_text("case,class\n" + "".join(f"{c},{['even', 'odd'][i % 2]}\n"
                                                                   for i, c in enumerate(cases)))  # fmt: skip
    run = work / f"run_{spec['preset']}"
    shutil.rmtree(run, ignore_errors=True)
    train(ds, spec["checkpoint"], run, PlanRequest(input_size=spec["size"], batch_size=spec["batch"]),
          TrainOptions(fold="all", epochs=1, num_workers=0, progress=False, device=spec["device"]))  # fmt: skip
    n = len(list((ds / "imagesTs").glob("*_0000.nii.gz")))
    t = time.perf_counter()
    predict([run], ds / "imagesTs", work / f"pred_{spec['preset']}.csv", device=spec["device"], progress=False)
    return {"predict_s_per_case": (time.perf_counter() - t) / n, "cases": n}


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=os.environ.copy())  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {spec['name']}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    if spec["kind"] == "classifier":
        return classifier_step(spec)
    if spec["kind"] == "predict":
        return predict_per_case(spec)
    return bench_finetune.worker(spec)


def specs_for(preset: str, paths: dict, args) -> list[dict]:
    common = dict(threads=args.threads, warmup=args.warmup, iters=args.iters, size=list(args.size),
                  batch=args.batch, preset=preset, device=args.device)  # fmt: skip
    cfg = json.loads(paths["mim_plans"][preset].read_text())["configurations"]["3d_fullres"]
    cfg["patch_size"] = list(args.size)
    cfg["architecture"]["arch_kwargs"]["patch_size"] = list(args.size)
    cfg["batch_size"] = args.batch
    return [
        dict(common, name=f"classifier_{preset}", kind="classifier", pooling="mean"),
        dict(common, name=f"segmentation_{preset}", kind="train", trainer="mim",
             plans=str(paths["mim_plans"][preset]), configuration=cfg, dataset_json=str(paths["dataset_json"])),
    ]  # fmt: skip


def summary(cls: dict, seg: dict) -> str:
    """Classifier against nnUNetTrainerMiM: step time, and peak memory as delta and absolute (CPU)."""
    t = (f"step median {cls['iteration_s']:.3f} s (min {min(cls['iteration_times_s']):.3f}) against "
         f"{seg['iteration_s']:.3f} s (min {min(seg['iteration_times_s']):.3f}), "
         f"{cls['iteration_s'] / seg['iteration_s']:.2f}x")  # fmt: skip
    if "peak_cuda_gb" in cls:
        return t + f"; classifier peak CUDA memory {cls['peak_cuda_gb']:.2f} GiB (nnUNetTrainerMiM's step: CPU)"
    return t + (f"; peak RSS above the baseline {cls['peak_delta_gb']:.2f} against {seg['peak_delta_gb']:.2f} GiB, "
                f"{cls['peak_delta_gb'] / seg['peak_delta_gb']:.2f}x; absolute {cls['peak_rss_gb']:.2f} against "
                f"{seg['peak_rss_gb']:.2f} GiB (baselines {cls['base_rss_gb']:.2f}, {seg['base_rss_gb']:.2f})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/mim_bench_classify")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--size", nargs=3, type=int, default=[64, 64, 64], help="input size = segmentation patch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="the classifier's device (nnUNetTrainerMiM's step: CPU)")
    ap.add_argument("--out", default="benchmarks/results/classify.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    work = Path(args.work)
    paths = bench_finetune.prepare(work, args.presets, 8.0)
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for preset in args.presets:
            for spec in specs_for(preset, paths, args):
                res = run_worker(spec)
                print(f"round {r} {spec['name']}: {json.dumps({k: v for k, v in res.items() if 'times' not in k})}",
                      flush=True)  # fmt: skip
                if spec["name"] not in results or res["iteration_s"] < results[spec["name"]]["iteration_s"]:
                    results[spec["name"]] = res
    for preset in args.presets:
        res = run_worker(dict(name=f"predict_{preset}", kind="predict", preset=preset, size=list(args.size),
                              batch=args.batch, device=args.device, work=str(work),
                              dataset=str(paths["dataset_json"].parent),
                              checkpoint=str(work / f"{preset}.safetensors")))  # fmt: skip
        results[f"predict_{preset}"] = res
        print(f"{preset} at {args.size} batch {args.batch}: "
              + summary(results[f"classifier_{preset}"], results[f"segmentation_{preset}"])
              + f"; predict {res['predict_s_per_case']:.2f} s per case")  # fmt: skip
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
              "args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}  # fmt: skip
    print(f"CPU: {report['cpu']} ({report['cores']} cores), torch threads {args.threads}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
