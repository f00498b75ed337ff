"""Container entry: predict every image in the input folder and write the profile's files to the output folder.

Challenges that run containers (FLARE, grand-challenge) mount the test images read-only and collect whatever the
container leaves in its output folder. This script runs ``mim_nnunet_submit`` into a scratch folder, so that
nothing reaches the output unless validation passed, then copies the validated predictions (the profile's
layout, no zip) into the output folder. Paths and options come from environment variables, so the same script
runs locally in tests:

    MIM_SUBMIT_INPUT     test images                  (default /input)
    MIM_SUBMIT_OUTPUT    where predictions go         (default /output)
    MIM_SUBMIT_MODEL     model folder(s), os.pathsep-separated, or find_best_configuration output (/opt/model)
    MIM_SUBMIT_PROFILE   profile name or .json        (default generic)
    MIM_SUBMIT_DEVICE    cpu | cuda                   (default: cuda when available)
    MIM_SUBMIT_ARGS      extra mim_nnunet_submit arguments, shell-quoted (e.g. "--disable-tta -np 0")
    MIM_SUBMIT_WORK      scratch folder               (default: a temporary folder, removed afterwards)
    MIM_SUBMIT_MANIFEST  if set, copy manifest.json to this path (kept out of the output folder by default,
                         since some challenges reject extra files there)
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from mim_nnunet.cli.submit import main as submit_main


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main() -> int:
    env = os.environ
    in_dir = Path(env.get("MIM_SUBMIT_INPUT", "/input"))
    out_dir = Path(env.get("MIM_SUBMIT_OUTPUT", "/output"))
    models = [m for m in env.get("MIM_SUBMIT_MODEL", "/opt/model").split(os.pathsep) if m]
    profile = env.get("MIM_SUBMIT_PROFILE", "generic")
    device = env.get("MIM_SUBMIT_DEVICE") or _default_device()
    extra = shlex.split(env.get("MIM_SUBMIT_ARGS", ""))
    work_env = env.get("MIM_SUBMIT_WORK")
    work = Path(work_env) if work_env else Path(tempfile.mkdtemp(prefix="mim_submit_"))
    try:
        argv = ["-i", str(in_dir), "--profile", profile, "-o", str(work / "submission"), "--device", device]
        for m in models:
            argv += ["-m", m]
        rc = submit_main([*argv, *extra])
        if rc != 0:
            print(
                f"entry: mim_nnunet_submit failed (exit {rc}); nothing written to {out_dir}", file=sys.stderr
            )
            return rc
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "submission" / "predictions", out_dir, dirs_exist_ok=True)
        if env.get("MIM_SUBMIT_MANIFEST"):
            shutil.copy2(work / "submission" / "manifest.json", env["MIM_SUBMIT_MANIFEST"])
        print(f"entry: predictions written to {out_dir}")
        return 0
    finally:
        if not work_env:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
