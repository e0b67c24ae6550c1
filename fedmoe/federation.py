"""The in-process runner: every shard's worker trains its path locally, then one outer step per module."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from fedmoe.modular import ModularModel, Path, path_module_states
from fedmoe.outer import OuterOptimizer, Update, average_updates, outer_gradient
from fedmoe.tasks import Task
from fedmoe.train import InnerConfig, train_local


@dataclass(frozen=True)
class Assignment:
    """A worker's job: train `path` on the training units `units`."""

    path: Path
    units: np.ndarray


def train_federation(
    model: ModularModel,
    assignments: Sequence[Assignment],
    task: Task,
    rounds: int,
    inner: InnerConfig,
    outer: OuterOptimizer,
    seed: int = 0,
    on_round: Callable[[int, list[float]], None] | None = None,
    progress: str | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> list[list[float]]:
    """Run `rounds` DiLoCo rounds in this process; return each round's mean inner loss per worker.

    Workers keep their AdamW state across rounds. `on_round(round, losses)` runs after each outer
    step (evaluation, plots); `progress` is the label of a progress bar, or None for none;
    `lr_scale(round)` multiplies the inner learning rate of that round (see `cosine_schedule`).
    """
    batches = [task.batches(a.units, inner.batch_size, seed + 1000 * i) for i, a in enumerate(assignments)]
    inner_states: list[dict | None] = [None] * len(assignments)
    history = []
    with tqdm(total=rounds * len(assignments), desc=progress, disable=True if progress is None else None, leave=False) as bar:
        for r in range(rounds):
            round_inner = inner if lr_scale is None else replace(inner, lr=inner.lr * lr_scale(r))
            updates, losses = [], []
            for i, a in enumerate(assignments):
                worker = copy.deepcopy(model.compose(a.path))
                start = path_module_states(worker, a.path)
                loss, inner_states[i] = train_local(worker, batches[i], round_inner, inner_states[i])
                updates.append(Update(outer_gradient(start, path_module_states(worker, a.path)), float(len(a.units))))
                losses.append(loss)
                bar.update()
            outer.step(average_updates(updates))
            history.append(losses)
            bar.set_postfix(round=r + 1, loss=f"{np.mean(losses):.3f}")
            if on_round is not None:
                on_round(r, losses)
    return history


def cosine_schedule(total_rounds: int, offset: int = 0, floor: float = 0.1) -> Callable[[int], float]:
    """Inner learning-rate multiplier per round: cosine from 1 down to `floor` over `total_rounds`.

    `offset` is the number of rounds already run, for a run continued in phases.
    """

    def scale(r: int) -> float:
        progress = (offset + r) / max(total_rounds - 1, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return scale
