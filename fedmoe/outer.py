"""DiLoCo outer step per module: average outer gradients over the paths that hold a module, then Nesterov SGD."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe.modular import ModularModel

ModuleStates = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Update:
    """One worker's outer gradient (start - end weights) per module it trained, and its weight (shard size)."""

    deltas: ModuleStates
    weight: float


def outer_gradient(start: ModuleStates, end: ModuleStates) -> ModuleStates:
    """start - end, per module and parameter: the direction an outer *descent* step follows."""
    return {key: {name: start[key][name] - t for name, t in state.items()} for key, state in end.items()}


def average_updates(updates: Sequence[Update]) -> ModuleStates:
    """Weighted mean of outer gradients, per module, over the updates that contain that module."""
    sums: ModuleStates = {}
    weights: dict[str, float] = {}
    for update in updates:
        if update.weight <= 0:
            raise ValueError(f"update weight must be positive, got {update.weight}")
        for key, state in update.deltas.items():
            acc = sums.setdefault(key, {name: torch.zeros_like(t) for name, t in state.items()})
            for name, t in state.items():
                acc[name].add_(t, alpha=update.weight)
            weights[key] = weights.get(key, 0.0) + update.weight
    return {key: {name: t / weights[key] for name, t in state.items()} for key, state in sums.items()}


class OuterOptimizer:
    """Nesterov SGD on the grid, stepping only the modules that received an outer gradient."""

    def __init__(self, model: ModularModel, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        self.model = model
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    def step(self, outer_grads: ModuleStates) -> None:
        """Apply one outer step; modules absent from `outer_grads` and their momentum stay untouched."""
        for key, state in outer_grads.items():
            params = dict(self.model.module(key).named_parameters())
            for name, grad in state.items():
                if grad.shape != params[name].shape:
                    raise ValueError(f"outer gradient {key}/{name}: shape {tuple(grad.shape)}, expected {tuple(params[name].shape)}")
                params[name].grad = grad.to(params[name].dtype).clone()
        self.sgd.step()
        self.sgd.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers, for checkpoints."""
        return self.sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore momentum buffers saved by `state_dict`."""
        self.sgd.load_state_dict(state)
