"""Statistics and report cells shared by the project's studies (label efficiency, tumours, and later ones).

What it owns: the summary of one score over seeds (mean +- sd), the difference of an arm to a baseline arm --
Welch's unpaired t interval and the seed-paired t interval -- and how those appear in a markdown table, the
marked block a study rewrites in its page, and the plot panel of the paired differences. What it must not do:
know a study's folders, runs, arms or nnU-Net; its inputs are numbers keyed by seed.

Results are plain, JSON-ready dicts (the studies store them in their ``study.json`` as they are):

- :func:`welch` -> ``{"difference", "ci95"}``: the difference of the two means, and Welch's 95 % interval
  (``scipy.stats.ttest_ind(equal_var=False)``), which ignores any pairing; ``None`` with fewer than two values
  on a side;
- :func:`paired` -> ``{"seeds", "n", "mean", "sd", "ci95", "half_width", "n_above", "differences"}``: per seed
  both arms have, the arm's value minus the baseline's; mean, sd (n - 1), the paired-t 95 % interval
  (``scipy.stats.ttest_rel``; ``None`` with one seed or when every difference is equal) and how many seeds
  were above 0; ``None`` without a common seed.

A seed's value that is NaN (a score undefined for that run) is left out of both, as it is of :func:`mean_sd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _finite(values) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    return v[~np.isnan(v)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sd (n - 1) of the non-NaN values; sd 0 for one value, (NaN, NaN) for none."""
    v = _finite(values)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def welch(a: Sequence[float], b: Sequence[float]) -> dict | None:
    """mean(a) - mean(b) with Welch's 95 % interval; ``None`` with fewer than two values on a side. The
    interval is ``None`` when neither side varies (the t statistic is undefined)."""
    from scipy.stats import ttest_ind

    a, b = _finite(a), _finite(b)
    if a.size < 2 or b.size < 2:
        return None
    ci = None
    if np.ptp(a) > 0 or np.ptp(b) > 0:
        res = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        ci = [float(res.low), float(res.high)]
    return {"difference": float(a.mean() - b.mean()), "ci95": ci}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict | None:
    """Seed-paired differences ``a[seed] - b[seed]`` over the seeds both have (NaN left out); see the module
    docstring for the keys. ``None`` without a common seed."""
    from scipy.stats import ttest_rel

    common = sorted(i for i in set(a) & set(b) if not (math.isnan(a[i]) or math.isnan(b[i])))
    if not common:
        return None
    d = np.asarray([a[i] - b[i] for i in common], dtype=float)
    ci = None
    if len(d) > 1 and np.ptp(d) > 0:
        res = ttest_rel([a[i] for i in common], [b[i] for i in common]).confidence_interval(0.95)
        ci = [float(res.low), float(res.high)]
    return {
        "seeds": common,
        "n": len(common),
        "mean": float(d.mean()),
        "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
        "ci95": ci,
        "half_width": None if ci is None else (ci[1] - ci[0]) / 2,
        "n_above": int((d > 0).sum()),
        "differences": {str(i): float(x) for i, x in zip(common, d)},
    }


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """Both comparisons of an arm's per-seed values ``a`` with the baseline's ``b``:
    ``{"paired", "welch"}``."""
    return {"paired": paired(a, b), "welch": welch(list(a.values()), list(b.values()))}


def summary(by_seed: Mapping[int, float]) -> dict:
    """One score over the seeds: ``{"mean", "sd", "per_seed"}`` (the per-seed values that ``compare`` pairs)."""
    m, sd = mean_sd(list(by_seed.values()))
    return {"mean": m, "sd": sd, "per_seed": dict(by_seed)}


# --- table cells -----------------------------------------------------------------------------------------
def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """``0.600 +- 0.141``; ``-`` for a score no run defined (NaN)."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def format_paired(p: dict | None) -> str:
    """``+0.022 [-0.128, +0.173], sd 0.094, 3/4 above``; the parts that need two seeds are left out;
    '' for None."""
    if not p:
        return ""
    ci = f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else ""
    sd = f", sd {p['sd']:.3f}" if p["sd"] is not None else ""
    return f"{p['mean']:+.3f}{ci}{sd}, {p['n_above']}/{p['n']} above"


def comparison_cells(is_baseline: bool, comparison: dict | None) -> list[str]:
    """The paired and the Welch cell of one comparison (a ``compare`` result) with the baseline arm."""
    if is_baseline:
        return ["(baseline)", "(baseline)"]
    if not comparison:
        return ["", ""]
    return [format_paired(comparison["paired"]), format_welch(comparison["welch"])]


def format_welch(w: dict | None) -> str:
    """``+0.022 [-0.16, +0.20]``; '' for None, the difference alone when the interval is undefined."""
    if not w:
        return ""
    if w["ci95"] is None:
        return f"{w['difference']:+.3f} (no spread)"
    lo, hi = w["ci95"]
    return f"{w['difference']:+.3f} [{lo:+.2f}, {hi:+.2f}]"


#: what the paired and the Welch cells mean, for a report's notes (fields metric, baseline, seeding)
COMPARISON_NOTE = (
    "Paired {metric} - {baseline}: per seed, the arm's {metric} minus the same network's from random init at "
    "the same k and seed (both runs drew the same batches in the same order: every batch is fixed by the "
    "seed, `{seeding}`); mean over the seeds both have, paired-t 95 % confidence interval "
    "(scipy.stats.ttest_rel), the sd of the differences, and how many seeds were above 0. "
    "Welch: the difference of the two arms' mean {metric} with Welch's 95 % interval (scipy.stats.ttest_ind, "
    "unequal variances), which ignores the pairing. An interval that contains 0 is no evidence either way; "
    "its half-width bounds the effect the runs can rule out."
)


# --- the report page -------------------------------------------------------------------------------------
def write_marked_block(path: Path, block: str, begin: str, end: str, title: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in the page ``path`` in place of the
    marked block there, keeping the hand-written text around it; a new page gets ``title`` as its heading, a
    page without markers the block at its end."""
    text = path.read_text() if path.is_file() else f"# {title}\n\n{begin}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def plot_paired(ax, groups: Sequence[tuple[str, dict]], ylabel: str) -> None:
    """One matplotlib panel: per group (label, :func:`paired` result), each seed's difference (dots), their
    mean and 95 % interval (diamond and bar)."""
    groups = [(label, p) for label, p in groups if p]
    for x, (_, p) in enumerate(groups):
        d = list(p["differences"].values())
        jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
        ax.scatter(x + jitter, d, s=14, alpha=0.7, color="C0")
        if p["ci95"] is not None:
            lo, hi = p["ci95"]
            err = [[p["mean"] - lo], [hi - p["mean"]]]
            ax.errorbar([x + 0.25], [p["mean"]], yerr=err, fmt="D", color="C3", capsize=4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(-0.6, max(len(groups), 1) - 0.4)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("paired differences: seeds (dots), mean and 95 % CI")
    ax.grid(alpha=0.3)
