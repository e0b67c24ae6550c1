"""Plots of training runs (matplotlib, written to PNG without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
