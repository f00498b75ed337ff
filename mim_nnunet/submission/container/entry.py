"""Container entry: predict every image in the input folder and write the profile's files to the output folder.

Challenges that run containers mount the test images and collect whatever the container leaves in its output
folder; each profile's ``container`` block says where (see ``predict.sh`` and the Dockerfile beside this file):

- FLARE22/23: ``docker container run ... -v $PWD/inputs/:/workspace/inputs/ -v $PWD/outputs/:/workspace/outputs/
  IMAGE /bin/bash -c "sh predict.sh"``, once per case (root /workspace, folders inputs/ and outputs/);
- AMOS22: ``./input`` -> ``./output`` in the working directory (root ".");
- generic / grand-challenge: ``/input`` -> ``/output`` (root "/").

This script runs the submission (:func:`mim_nnunet.submission.pipeline.submit`, what ``mim_nnunet_submit`` runs)
into a scratch folder, so that nothing reaches the output unless validation passed, then copies the validated
predictions (the profile's layout, no zip; the pipeline's ``PREDICTIONS`` folder) into the output folder. Paths and
options come from arguments or environment variables, so the same script runs locally in tests:

    --root / MIM_SUBMIT_ROOT       the folder the profile's input/output are relative to (default: the profile's
                                   container root; "." = the working directory)
    --input / MIM_SUBMIT_INPUT     test images (default: ROOT/<profile input>)
    --output / MIM_SUBMIT_OUTPUT   where predictions go (default: ROOT/<profile output>)
    MIM_SUBMIT_MODEL     model folder(s), os.pathsep-separated, or find_best_configuration output (/opt/model)
    MIM_SUBMIT_PROFILE   profile name or .json        (default generic)
    MIM_SUBMIT_DEVICE    cpu | cuda                   (default: cuda when available)
    MIM_SUBMIT_ARGS      extra mim_nnunet_submit options, shell-quoted (e.g. "--disable-tta -np 0")
    MIM_SUBMIT_WORK      scratch folder               (default: a temporary folder, removed afterwards)
    MIM_SUBMIT_MANIFEST  if set, copy manifest.json to this path (kept out of the output folder by default,
                         since some challenges reject extra files there)

Only run it with a model folder you trust: nnU-Net loads checkpoints with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from mim_nnunet.cli.submit import EXIT_INVALID, EXIT_OK, EXIT_USAGE, submit_options, submit_parser
from mim_nnunet.submission.pipeline import MANIFEST, PREDICTIONS, OutputExistsError, SubmitResult, submit
from mim_nnunet.submission.predict import ModelError
from mim_nnunet.submission.profiles import ContainerSpec, ProfileError, load_profile

DEFAULT_CONTAINER = ContainerSpec(input="input", output="output", root="/")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_folders(
    profile_name: str, root: str | None, in_dir: str | None, out_dir: str | None
) -> tuple[Path, Path]:
    """The input and output folders of a profile's container convention, each overridable."""
    spec = load_profile(profile_name).container or DEFAULT_CONTAINER
    base = Path(root or spec.root)
    base = Path.cwd() / base if not base.is_absolute() else base
    return Path(in_dir) if in_dir else base / spec.input, Path(out_dir) if out_dir else base / spec.output


def _writable(folder: Path) -> str | None:
    # Checked before inference: a non-root image user and a root-owned mounted folder fail only at the very end.
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        return (
            f"the output folder {folder} is not writable by uid {uid} ({existing} is not); make the mounted "
            "folder writable for it (e.g. chmod 777 outputs/, as FLARE23's evaluation script does)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="predict.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=env.get("MIM_SUBMIT_ROOT"))
    parser.add_argument("--input", default=env.get("MIM_SUBMIT_INPUT"))
    parser.add_argument("--output", default=env.get("MIM_SUBMIT_OUTPUT"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    profile = env.get("MIM_SUBMIT_PROFILE", "generic")
    try:
        in_dir, out_dir = resolve_folders(profile, args.root, args.input, args.output)
    except ProfileError as e:
        print(f"entry: {e}", file=sys.stderr)
        return 2
    if not in_dir.is_dir():
        print(f"entry: input folder {in_dir} does not exist (profile {profile})", file=sys.stderr)
        return 2
    models = [m for m in env.get("MIM_SUBMIT_MODEL", "/opt/model").split(os.pathsep) if m]
    device = env.get("MIM_SUBMIT_DEVICE") or _default_device()
    extra = shlex.split(env.get("MIM_SUBMIT_ARGS", ""))
    problem = _writable(out_dir)
    if problem:
        print(f"entry: {problem}", file=sys.stderr)
        return 2
    # MIM_SUBMIT_ARGS are mim_nnunet_submit options: read with its parser (defaults included), the rest given here
    options = submit_parser().parse_args(["-i", str(in_dir), "--device", device, *extra])
    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    work_env = env.get("MIM_SUBMIT_WORK")
    work = Path(work_env) if work_env else Path(tempfile.mkdtemp(prefix="mim_submit_"))
    try:
        rc, result = _submit(in_dir, [*models, *(options.model or [])], profile, work / "submission", options)
        if rc != EXIT_OK:
            print(f"entry: the submission failed (exit {rc}); nothing written to {out_dir}", file=sys.stderr)
            return rc
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(result.out_dir / PREDICTIONS, out_dir, dirs_exist_ok=True)
        if env.get("MIM_SUBMIT_MANIFEST"):
            shutil.copy2(result.out_dir / MANIFEST, env["MIM_SUBMIT_MANIFEST"])
        print(f"entry: predictions written to {out_dir}")
        return EXIT_OK
    finally:
        if not work_env:
            shutil.rmtree(work, ignore_errors=True)


def _submit(
    in_dir: Path, models: list[str], profile: str, work: Path, options: argparse.Namespace
) -> tuple[int, SubmitResult | None]:
    """The submission API with mim_nnunet_submit's exit codes: 0 validated, 1 invalid, 2 usage (profile, model,
    output)."""
    try:
        result = submit(
            in_dir,
            models,
            load_profile(profile),
            work,
            **submit_options(options),
            argv=["predict.sh", *sys.argv[1:]],
        )
    except (ProfileError, ModelError, OutputExistsError) as e:
        print(f"entry: error: {e}", file=sys.stderr)
        return EXIT_USAGE, None
    print(result.report.summary())
    return (EXIT_OK if result.ok else EXIT_INVALID), result


if __name__ == "__main__":
    sys.exit(main())
