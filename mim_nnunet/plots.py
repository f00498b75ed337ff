"""Pictures of a run: a pre-training run's ``progress.png`` (losses and learning rate over steps) and reconstruction
previews (input, masked input, reconstruction; middle slices of the three axes) per Mask-in-Mask level; a
classification run's per-epoch curves (:func:`plot_epochs`).

Matplotlib through the Agg canvas only (no pyplot state, no display needed). Files are written atomically, so a
viewer never sees half a PNG. With the norm-pix loss the model predicts each patch normalised by the target
patch's own mean and variance; for display the prediction is mapped back with those statistics (MAE does the
same), and visible patches show the input itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .losses import patchify, unpatchify

GREY = colormaps["gray"].with_extremes(bad="#3a6fb0")  # masked patches in blue


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_progress(records: list[dict], path: str | os.PathLike) -> None:
    """``records``: one dict per optimizer step with ``step``, ``lr`` and the losses ``rec1..3``, ``align12/23``;
    optionally the collapse watch ``collapse_cos12/23``, ``collapse_std12/23`` and the probe's ``probe_dice``
    (each gets its own panel when present)."""
    if not records:
        return
    steps = [r["step"] for r in records]
    # the matched pairs' cosine, 1 - align / 2, next to the unrelated pairs' one
    records = [r | {f"matched{p}": 1 - r[f"align{p}"] / 2 for p in ("12", "23")
                    if r.get(f"collapse_cos{p}") is not None and r.get(f"align{p}") is not None} for r in records]
    panels = [
        ("reconstruction loss (norm-pix MSE, masked tokens)", ["rec1", "rec2", "rec3"]),
        ("cross-level alignment loss (2 - 2 cos)", ["align12", "align23"]),
        ("total loss", ["loss"]),
        ("learning rate", ["lr"]),
        ("collapse watch: unrelated cos -> 1, std -> 0; informative while matched > unrelated",
         ["collapse_cos12", "collapse_cos23", "matched12", "matched23", "collapse_std12", "collapse_std23"]),
        ("linear probe: mean foreground Dice on held-out cases", ["probe_dice"]),
    ]  # fmt: skip
    panels = [(t, keys) for t, keys in panels if any(r.get(k) is not None for r in records for k in keys)]
    rows = (len(panels) + 1) // 2
    fig = Figure(figsize=(12, 4 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    labels = {"rec1": "level 1", "rec2": "level 2", "rec3": "level 3", "align12": "level 1 -> 2",
              "align23": "level 2 -> 3", "collapse_cos12": "cos 1 -> 2", "collapse_cos23": "cos 2 -> 3",
              "collapse_std12": "std 1 -> 2", "collapse_std23": "std 2 -> 3", "matched12": "matched cos 1 -> 2",
              "matched23": "matched cos 2 -> 3"}  # fmt: skip
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
            if pts:
                style = {"marker": "o", "markersize": 4} if key == "probe_dice" else {}
                style |= {"linestyle": "--"} if key.startswith("matched") else {}
                ax.plot(*zip(*pts), label=labels.get(key, key), linewidth=1, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _save(fig, Path(path))


def reconstruction_views(
    inputs: torch.Tensor,
    mask: torch.Tensor,
    prediction: torch.Tensor,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """One volume's ``input``, ``masked`` input (NaN where masked) and ``reconstruction`` as ``(S, S, S)`` arrays.

    ``inputs (C, S, S, S)``, ``mask (L,)`` with 1 = masked, ``prediction (L, 16^3 C)`` as the model outputs it.
    """
    x = inputs[None].float().cpu()
    c, grid = x.shape[1], tuple(s // 16 for s in x.shape[2:])
    target = patchify(x)
    pred = prediction[None].float().cpu()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + eps) ** 0.5 + mean
    m = mask.float().cpu()[None, :, None] > 0
    recon = torch.where(m, pred, target)
    masked = torch.where(m, torch.full_like(target, float("nan")), target)
    return {
        "input": x[0, 0],
        "masked input": unpatchify(masked, grid, c)[0, 0],
        "reconstruction": unpatchify(recon, grid, c)[0, 0],
    }


def plot_reconstruction(views: dict[str, torch.Tensor], title: str, path: str | os.PathLike) -> None:
    fig = Figure(figsize=(3 * len(views), 9), layout="constrained")
    axes = fig.subplots(3, len(views), squeeze=False)
    for col, (name, vol) in enumerate(views.items()):
        d, h, w = vol.shape
        slices = {"axial (z)": vol[d // 2], "coronal (y)": vol[:, h // 2], "sagittal (x)": vol[:, :, w // 2]}
        for row, (axis_name, img) in enumerate(slices.items()):
            ax = axes[row, col]
            ax.imshow(img.numpy(), cmap=GREY, vmin=0.0, vmax=1.0, origin="upper" if row == 0 else "lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(f"middle {axis_name}")
    fig.suptitle(title)
    _save(fig, Path(path))


def save_previews(output, out_dir: str | os.PathLike, step: int, norm_pix: bool = True) -> list[Path]:
    """A preview per level of a :class:`~mim_nnunet.model.mim.MiMOutput` (its first volume of each level)."""
    paths = []
    for n, level in enumerate(output.levels, start=1):
        views = reconstruction_views(level.inputs[0], level.masks[0], level.predictions[0], norm_pix)
        ratio = float(level.masks[0].float().mean())
        path = Path(out_dir) / f"step_{step:05d}_level{n}.png"
        plot_reconstruction(
            views,
            f"step {step}, level {n} (volume 1 of {level.inputs.shape[0]}, {ratio:.0%} of tokens masked)",
            path,
        )
        paths.append(path)
    return paths


def plot_epochs(records: list[dict], panels: list[tuple[str, list[str]]], path: str | os.PathLike) -> None:
    """A panel per ``(title, keys)`` of per-epoch ``records`` (each with ``epoch``): a classification run's
    ``progress.png`` (loss, validation accuracy and AUROC, learning rate)."""
    panels = [(t, keys) for t, keys in panels if any(r.get(k) is not None for r in records for k in keys)]
    if not records or not panels:
        return
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, linewidth=1, marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    _save(fig, Path(path))
