"""``mim_nnunet_demo``: the whole pipeline on the embedded synthetic CT, with the stock commands a user would type.

phantoms -> ``mim_nnunet_pretrain`` -> ``mim_nnunet_plan_and_preprocess`` -> ``nnUNetv2_train`` ->
``nnUNetv2_predict`` -> ``mim_nnunet_submit evaluate``. Each stage is a subprocess with its command line echoed,
so the log doubles as a recipe. Everything lives under ``--out`` (nnU-Net's three folders included); a stage
whose output already exists is skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..nnunet.paths import trainer_folder

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_MiMPhantom"


def _run(cmd: list[str], env: dict, log) -> float:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    log.write(f"$ {shlex.join(cmd)}\n")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env)
    if res.returncode:
        sys.exit(f"mim_nnunet_demo: stage failed with exit code {res.returncode}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mim_nnunet_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="demo_run", help="work folder (default: ./demo_run)")
    p.add_argument("--corpus-size", type=int, default=12, help="unlabeled phantoms for pre-training (default 12)")
    p.add_argument("--train-cases", type=int, default=8, help="labeled training phantoms (default 8)")
    p.add_argument("--test-cases", type=int, default=4, help="labeled test phantoms (default 4)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="MiM preset (default tiny)")
    p.add_argument("--pretrain-steps", type=int, default=150, help="pre-training steps (default 150)")
    p.add_argument("--trainer", default="nnUNetTrainerMiM_demo",
                   help="nnU-Net trainer for fine-tuning (default nnUNetTrainerMiM_demo: 20 epochs x 20 iterations)")
    p.add_argument("--memory-target", default="0.75",
                   help="planner memory target in GB (default 0.75: a ~48x48x64 patch that trains fast on a CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for every stage (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of pre-training (default 0)")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
        nnUNet_results=str(out / "nnUNet_results"), nnUNet_extTrainer=str(trainer_folder()),
        nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "2"), MPLBACKEND="Agg",
    )
    bindir = Path(sys.executable).parent
    exe = {name: str(bindir / name) for name in (
        "mim_nnunet_phantoms", "mim_nnunet_pretrain", "mim_nnunet_plan_and_preprocess", "nnUNetv2_train",
        "nnUNetv2_predict", "mim_nnunet_submit")}
    raw = out / "nnUNet_raw" / DATASET_NAME
    ckpt = out / "pretrain" / "checkpoint_final.safetensors"
    plans = out / "nnUNet_preprocessed" / DATASET_NAME / "MiMPlans.json"
    model_dir = out / "nnUNet_results" / DATASET_NAME / f"{args.trainer}__MiMPlans__3d_fullres" / "fold_0"
    pred = out / "predictions"
    times: dict[str, float] = {}
    with open(out / "commands.log", "a") as log:
        if not (out / "corpus").is_dir():
            times["phantoms"] = _run([exe["mim_nnunet_phantoms"], "corpus", "-o", str(out / "corpus"),
                                      "-n", str(args.corpus_size), "--seed", str(args.seed)], env, log)
        if not (raw / "dataset.json").is_file():
            times["phantoms"] = times.get("phantoms", 0) + _run(
                [exe["mim_nnunet_phantoms"], "dataset", "--raw", str(out / "nnUNet_raw"), "--id", str(DATASET_ID),
                 "--name", "MiMPhantom", "--train", str(args.train_cases), "--test", str(args.test_cases),
                 "--seed", str(args.seed)], env, log)
        if not ckpt.is_file():
            times["pretrain"] = _run(
                [exe["mim_nnunet_pretrain"], "-i", str(out / "corpus"), "-o", str(out / "pretrain"),
                 "--preset", args.preset, "--max-steps", str(args.pretrain_steps), "--batch-size", "2",
                 "--lr", "1e-3", "--save-every", str(max(1, args.pretrain_steps // 2)), "--device", args.device,
                 "--seed", str(args.seed)] + (["--resume"] if (out / "pretrain" / "resume_state.pt").is_file() else []),
                env, log)
        if not plans.is_file():
            times["plan"] = _run([exe["mim_nnunet_plan_and_preprocess"], "-d", str(DATASET_ID), "-pt", str(ckpt),
                                  "-np", "2", "-gpu_memory_target", args.memory_target], env, log)
        if not (model_dir / "checkpoint_final.pth").is_file():
            times["fine-tune"] = _run([exe["nnUNetv2_train"], str(DATASET_ID), "3d_fullres", "0", "-tr", args.trainer,
                                       "-p", "MiMPlans", "-device", args.device], env, log)
        times["predict"] = _run(
            [exe["nnUNetv2_predict"], "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
             "-c", "3d_fullres", "-f", "0", "-tr", args.trainer, "-p", "MiMPlans", "-device", args.device,
             "--disable_tta", "-npp", "1", "-nps", "1"], env, log)
        times["evaluate"] = _run([exe["mim_nnunet_submit"], "evaluate", "-p", str(pred), "-r", str(raw / "labelsTs"),
                                  "--tolerance", "2", "-o", str(out / "evaluation.json")], env, log)
    result = json.loads((out / "evaluation.json").read_text())
    summary = {"stage_seconds": {k: round(v, 1) for k, v in times.items()}, "evaluation": str(out / "evaluation.json")}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    fg = result["foreground_mean"]
    print(f"foreground mean on {result['n_cases']} test phantoms: Dice {fg['Dice']:.3f}, NSD@2mm {fg['NSD']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
