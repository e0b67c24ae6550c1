"""A multi-layer perceptron classifier, cut into levels."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedmoe.modular import ModularModel, split_evenly


def mlp_classifier(
    grid: tuple[int, ...], in_dim: int = 64, hidden: int = 128, depth: int = 2, classes: int = 10
) -> ModularModel:
    """An MLP of `depth` hidden layers and a linear head; its layers are spread over len(grid) levels."""
    stages: list[Callable[[], nn.Module]] = [lambda: nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())]
    stages += [lambda: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())] * (depth - 1)
    stages += [lambda: nn.Linear(hidden, classes)]
    groups = list(split_evenly(stages, len(grid)))
    return ModularModel([[nn.Sequential(*(make() for make in group)) for _ in range(n)] for group, n in zip(groups, grid)])
