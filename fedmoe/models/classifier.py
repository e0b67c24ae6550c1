"""A multi-layer perceptron classifier that can be cut into any number of levels."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedmoe.spec import staged_levels


def mlp_levels(
    in_dim: int = 64, hidden: int = 128, depth: int = 2, classes: int = 10
) -> Callable[[int], list[Callable[[], nn.Module]]]:
    """An MLP of `depth` hidden layers and a linear head, its layers spread evenly over the grid's levels."""
    stages: list[Callable[[], nn.Module]] = [lambda: nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())]
    stages += [lambda: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())] * (depth - 1)
    stages += [lambda: nn.Linear(hidden, classes)]
    return staged_levels(stages)
