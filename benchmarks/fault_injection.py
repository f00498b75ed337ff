"""Fault injection for ``mim_nnunet_pretrain``: kill runs at random points, resume them, compare with a run that
was never interrupted.

Each trial starts the CLI (tiny preset, phantom corpus, a few steps) as a requeued cluster job would, always with
the same command ending in ``--resume``, in its own process group, and hits it with one fault class:

- phase: ``preprocess`` (while the cache is being written; each such trial has its own cache), ``step`` (during
  a training step) or ``save`` (right after a save step's metrics line: checkpoint pair, previews, plot);
- signal: ``SIGKILL`` to the group (node failure, OOM killer), ``SIGTERM`` to the group (Slurm's time limit,
  ``scancel``), ``SIGINT`` to the group (Ctrl-C in a terminal).

Then it re-runs the identical command until it exits 0 (at most ``--max-resumes`` times) and checks that the run
folder is consistent (final checkpoint and resume state at the last step, metrics 1..N once each, no temporary
file, no cache registration left) and that the final weights are bit-identical (``torch.equal``) to those of the
uninterrupted reference run. Trials cycle through the 9 classes; the kill time within a phase is random.

    python benchmarks/fault_injection.py --trials 18 --workdir /tmp/faults

Prints a table of fault classes and outcomes and writes ``results.json`` in the work folder. Exit status 0 when
every trial ended consistent and bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("preprocess", "step", "save")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def make_corpus(folder: Path, n: int) -> None:
    import SimpleITK as sitk

    from mim_nnunet.data.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = make_phantom(
            100 + i, shape_mm=(80.0, 72.0, 64.0), spacing=(1.6, 1.6, 2.0 + 0.5 * i), labels=False
        )
        sitk.WriteImage(image, str(folder / f"case_{i}.nii.gz"), useCompression=True)


def command(corpus: Path, run: Path, cache: Path, steps: int, save_every: int) -> list[str]:
    return [
        sys.executable, "-m", "mim_nnunet.cli.pretrain", "-i", str(corpus), "-o", str(run), "--cache", str(cache),
        "--preset", "tiny", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "1", "--max-steps", str(steps),
        "--save-every", str(save_every), "--num-workers", "1", "--preprocess-workers", "2", "--no-progress",
        "--resume",
    ]  # fmt: skip


def environment() -> dict:
    # one thread everywhere: the same arithmetic in every invocation, and fair to a shared CPU
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                         "MPLBACKEND": "Agg"}  # fmt: skip


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)


def lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


def wait_for(proc: subprocess.Popen, condition, timeout: float = 600.0) -> bool:
    """Poll ``condition`` every 10 ms; False if the process ended (or time ran out) first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def inject(proc, phase: str, run: Path, cache: Path, steps: int, save_every: int, rng: random.Random) -> str:
    """Wait for the phase, then a random delay within it; returns where the kill landed (as observed)."""
    from mim_nnunet.data.cache import FINGERPRINT, SETTINGS

    metrics = run / "metrics.jsonl"
    if phase == "preprocess":
        if not wait_for(proc, lambda: (cache / SETTINGS).is_file()):
            return "never reached"
        time.sleep(rng.uniform(0.0, 4.0))
        return "preprocess" if not (cache / FINGERPRINT).is_file() else "after preprocess"
    if phase == "step":
        target = rng.randrange(0, steps - 1)  # kill during step target + 1
        if not wait_for(proc, lambda: lines(metrics) >= target and (run / "config.json").is_file()):
            return "never reached"
        time.sleep(rng.uniform(0.0, 1.0))
        return f"step {lines(metrics) + 1}"
    saves = list(range(save_every, steps, save_every))
    target = rng.choice(saves)
    if not wait_for(proc, lambda: lines(metrics) >= target):
        return "never reached"
    time.sleep(rng.uniform(0.0, 0.6))
    return f"save of step {target}"


def check_folder(run: Path, cache: Path, steps: int) -> list[str]:
    from mim_nnunet.checkpoint import load_checkpoint, load_resume_state

    problems = []
    try:
        _, meta = load_checkpoint(run / "checkpoint_final.safetensors")
        if meta.step != steps:
            problems.append(f"final checkpoint at step {meta.step}")
        if load_resume_state(run / "resume_state.pt")["step"] != steps:
            problems.append("resume state not at the last step")
        _, latest = load_checkpoint(run / "checkpoint_latest.safetensors")
        if latest.step != steps:
            problems.append(f"latest checkpoint at step {latest.step}")
    except Exception as e:  # noqa: BLE001 -- any failure is an outcome to report
        problems.append(f"{type(e).__name__}: {e}")
    recorded = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if recorded != list(range(1, steps + 1)):
        problems.append(f"metrics steps {recorded}")
    if tmp := [p.name for p in run.iterdir() if p.name.endswith(".tmp")]:
        problems.append(f"temporaries {tmp}")
    if users := list((cache / "users").glob("*.json")):
        problems.append(f"cache registrations left {[p.name for p in users]}")
    return problems


def identical(run: Path, reference: dict) -> bool:
    import torch

    from mim_nnunet.checkpoint import load_checkpoint

    try:
        state, _ = load_checkpoint(run / "checkpoint_final.safetensors")
    except Exception:  # noqa: BLE001
        return False
    return set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=18, help="number of faults injected (cycles through 9 classes)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of the schedule")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--cases", type=int, default=3, help="phantom volumes in the corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--max-resumes", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mim_fault_injection"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    # A shell starts background jobs with SIGINT ignored, and children inherit it: give them the default, as a
    # terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    from mim_nnunet.checkpoint import load_checkpoint

    rng = random.Random(args.seed)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    corpus, shared_cache = work / "corpus", work / "shared_cache"
    make_corpus(corpus, args.cases)

    t0 = time.perf_counter()
    ref = work / "reference"
    ref.mkdir(parents=True)
    rc = subprocess.run(command(corpus, ref, shared_cache, args.steps, args.save_every), env=environment(),
                        stdout=open(ref / "stdout.txt", "wb"), stderr=subprocess.STDOUT).returncode  # fmt: skip
    if rc != 0:
        print(f"the reference run failed (rc {rc}); see {ref / 'stdout.txt'}", file=sys.stderr)
        return 1
    reference, _ = load_checkpoint(ref / "checkpoint_final.safetensors")
    print(f"reference run: {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)

    classes = [(ph, sig) for ph in PHASES for sig in SIGNALS]
    results = []
    for trial in range(args.trials):
        phase, sig = classes[trial % len(classes)]
        folder = work / f"trial_{trial:02d}"
        run = folder / "run"
        # preprocessing faults need a cache of their own; the others share one, as runs on a cluster do
        cache = folder / "cache" if phase == "preprocess" else shared_cache
        folder.mkdir(parents=True)
        cmd = command(corpus, run, cache, args.steps, args.save_every)
        log = folder / "stdout.txt"
        t = time.perf_counter()
        proc = start(cmd, log)
        landed = inject(proc, phase, run, cache, args.steps, args.save_every, rng)
        if proc.poll() is None:
            os.killpg(proc.pid, SIGNALS[sig])
        try:
            rc_kill = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc_kill = f"hung, killed ({proc.wait()})"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what a cluster does to leftovers of the job
        except ProcessLookupError:
            pass
        if rc_kill == 0:
            landed += " (the run ended before the signal)"
        resumes, rc = 0, None
        while resumes < args.max_resumes and rc != 0:
            resumes += 1
            rc = subprocess.run(cmd, env=environment(), stdout=open(log, "ab"), stderr=subprocess.STDOUT).returncode
        problems = check_folder(run, cache, args.steps) if rc == 0 else [f"resume ended with rc {rc}"]
        same = rc == 0 and identical(run, reference)
        outcome = {"trial": trial, "phase": phase, "signal": sig, "landed": landed, "rc_at_fault": rc_kill,
                   "resumes": resumes, "rc_resume": rc, "consistent": not problems, "problems": problems,
                   "bit_identical": same, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        results.append(outcome)
        print(json.dumps(outcome), flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"{'phase':<11} {'signal':<8} {'trials':>6} {'killed where (observed)':<44} {'rc at fault':<16} "
          f"{'resumed':>7} {'consistent':>10} {'identical':>9}")  # fmt: skip
    for phase, sig in classes:
        rs = [r for r in results if (r["phase"], r["signal"]) == (phase, sig)]
        if not rs:
            continue
        where = ", ".join(sorted({r["landed"] for r in rs}))
        rcs = ", ".join(sorted({str(r["rc_at_fault"]) for r in rs}))
        print(f"{phase:<11} {sig:<8} {len(rs):>6} {where[:44]:<44} {rcs[:16]:<16} "
              f"{sum(r['rc_resume'] == 0 for r in rs):>7} {sum(r['consistent'] for r in rs):>10} "
              f"{sum(r['bit_identical'] for r in rs):>9}")  # fmt: skip
    good = sum(r["consistent"] and r["bit_identical"] for r in results)
    print(f"\n{good} of {len(results)} trials ended with a consistent, resumable run folder and final weights "
          f"bit-identical to the uninterrupted run ({time.perf_counter() - t0:.0f} s in all)")  # fmt: skip
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
