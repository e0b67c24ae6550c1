"""Plots of training runs and image grids of samples (matplotlib, written to PNG without a display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

if TYPE_CHECKING:
    from fedmoe.experiment import RunResult


def plot_rounds(dense: RunResult, runs: list[RunResult], metric: str, path: Path) -> Path:
    """Metric per round: each expert alone, the top-1 routed ensemble and the dense baseline;
    one panel per run.
    """
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), sharey=True, squeeze=False)
    dense_x = [r["round"] for r in dense.rounds]
    dense_y = [r["dense"] for r in dense.rounds]
    for ax, run in zip(axes[0], runs):
        x = [r["round"] for r in run.rounds]
        for i in range(len(run.rounds[0]["experts"])):
            ax.plot(x, [r["experts"][i] for r in run.rounds], alpha=0.5, lw=1, label=f"expert {i} alone")
        ax.plot(x, [r["top1"] for r in run.rounds], color="black", lw=2, label="routed ensemble (top-1)")
        ax.plot(dense_x, dense_y, color="red", lw=2, ls="--", label="dense baseline")
        ax.set_title(f"{run.name} shards")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_grid(
    samples: torch.Tensor, columns: int | None = None, value_range: tuple[float, float] = (-1, 1)
) -> np.ndarray:
    """Samples as one grayscale or RGB image: a grid of `columns` (default: square) tiles, one pixel of
    padding; pixel values clipped to `value_range` and scaled to [0, 1]. Flat samples of D numbers are
    square images when D is a square (64 -> 8x8); images are (C, H, W) with 1 or 3 channels."""
    x = torch.as_tensor(samples).detach().float()
    if x.dim() == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"flat samples of {x.shape[1]} numbers are not square images")
        x = x.view(len(x), 1, side, side)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"samples are (N, D) or (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
    low, high = value_range
    x = ((x - low) / (high - low)).clamp(0, 1)
    n, c, h, w = x.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i in range(n):
        top, left = 1 + (i // columns) * (h + 1), 1 + (i % columns) * (w + 1)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def save_grid(samples: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> Path:
    """Write samples (pixels in [-1, 1]) as a PNG grid (see `image_grid`), each pixel `scale` x `scale`."""
    grid = image_grid(samples, columns)
    grid = (
        np.kron(grid, np.ones((scale, scale))) if grid.ndim == 2 else grid.repeat(scale, 0).repeat(scale, 1)
    )
    plt.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
    return Path(path)
