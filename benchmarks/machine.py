"""The machine a benchmark ran on, for the line that names it beside every figure (the CPU model changes between
sessions, so a figure without it cannot be compared)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """lscpu's "Model name" (e.g. "AMD EPYC"); /proc/cpuinfo's "model name" where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        key = "Model name"
    except (OSError, subprocess.CalledProcessError):
        try:
            with open("/proc/cpuinfo") as f:
                out, key = f.read(), "model name"
        except OSError:
            return platform.processor() or platform.machine() or "unknown"
    found = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith(key)]
    return found[0] if found else "unknown"
