"""The in-process runner: every shard's worker trains its path locally, then one outer step per module."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from fedmoe.modular import ModularModel, Path
from fedmoe.outer import OuterOptimizer
from fedmoe.strategies.aggregate import aggregate
from fedmoe.tasks import Task
from fedmoe.train import InnerConfig
from fedmoe.worker import Variant, Worker


@dataclass(frozen=True)
class WorkerStats:
    """A worker's round in numbers: its variant, mean inner loss and outer-gradient bytes on the wire."""

    variant: str
    loss: float
    upload_bytes: int


@dataclass(frozen=True)
class Assignment:
    """A worker's job: train `path` on the training units `units`, holding the path as `variant` says."""

    path: Path
    units: np.ndarray
    variant: Variant = field(default_factory=Variant)


def train_federation(
    model: ModularModel,
    assignments: Sequence[Assignment],
    task: Task,
    rounds: int,
    inner: InnerConfig,
    outer: OuterOptimizer,
    seed: int = 0,
    on_round: Callable[[int, list[WorkerStats]], None] | None = None,
    progress: str | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> list[list[WorkerStats]]:
    """Run `rounds` DiLoCo rounds in this process; return each round's stats per worker.

    Workers keep their AdamW state and error feedback across rounds. `on_round(round, stats)` runs
    after each outer step (evaluation, plots); `progress` is the label of a progress bar, or None
    for none; `lr_scale(round)` multiplies the inner learning rate of that round (see `cosine_schedule`).
    """
    workers = [
        Worker(a.path, task.batches(a.units, inner.batch_size, seed + 1000 * i), float(len(a.units)), a.variant, seed + i)
        for i, a in enumerate(assignments)
    ]
    history = []
    with tqdm(total=rounds * len(workers), desc=progress, disable=True if progress is None else None, leave=False) as bar:
        for r in range(rounds):
            round_inner = inner if lr_scale is None else replace(inner, lr=inner.lr * lr_scale(r))
            uploads = []
            for worker in workers:
                uploads.append(worker.run_round(model, round_inner, r))
                bar.update()
            outer.step(*aggregate(model, uploads))
            stats = [WorkerStats(u.variant.name, u.loss, u.nbytes) for u in uploads]
            history.append(stats)
            bar.set_postfix(round=r + 1, loss=f"{np.mean([s.loss for s in stats]):.3f}")
            if on_round is not None:
                on_round(r, stats)
    return history


def cosine_schedule(total_rounds: int, offset: int = 0, floor: float = 0.1) -> Callable[[int], float]:
    """Inner learning-rate multiplier per round: cosine from 1 down to `floor` over `total_rounds`.

    `offset` is the number of rounds already run, for a run continued in phases.
    """

    def scale(r: int) -> float:
        progress = (offset + r) / max(total_rounds - 1, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return scale
