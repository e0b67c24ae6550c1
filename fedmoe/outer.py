"""DiLoCo outer step per module: average outer gradients over the paths that hold a module,
then Nesterov SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe.modular import ModularModel

ModuleStates = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Update:
    """One worker's outer gradient (start - end weights) per module it trained, and its weight (shard size).

    `masks` marks, per module and parameter, the coordinates the worker held (a pruned sub-model);
    a parameter without a mask was held whole. Values outside the mask are ignored.
    """

    deltas: ModuleStates
    weight: float
    masks: ModuleStates | None = None


def average_updates(updates: Sequence[Update]) -> tuple[ModuleStates, ModuleStates]:
    """Per coordinate, the weighted mean of the outer gradients of the updates that hold it;
    and that coverage.

    Returns (mean, held): `held` is True where at least one update holds the coordinate; the mean
    is 0 elsewhere, and `OuterOptimizer.step` leaves those coordinates and their momentum alone.
    """
    sums: ModuleStates = {}
    totals: ModuleStates = {}
    for update in updates:
        if update.weight <= 0:
            raise ValueError(f"update weight must be positive, got {update.weight}")
        masks = update.masks or {}
        for key, state in update.deltas.items():
            acc = sums.setdefault(key, {})
            tot = totals.setdefault(key, {})
            for name, t in state.items():
                mask = masks.get(key, {}).get(name)
                w = torch.full_like(t, update.weight) if mask is None else mask.to(t.dtype) * update.weight
                acc[name] = acc[name] + w * t if name in acc else w * t
                tot[name] = tot[name] + w if name in tot else w
    mean = {
        k: {n: torch.where(totals[k][n] > 0, t / totals[k][n].clamp_min(1e-30), 0.0) for n, t in s.items()}
        for k, s in sums.items()
    }
    held = {k: {n: w > 0 for n, w in s.items()} for k, s in totals.items()}
    return mean, held


class OuterOptimizer:
    """Nesterov SGD on the grid, stepping only the modules that received an outer gradient."""

    def __init__(self, model: ModularModel, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
        self.model = model
        self.sgd = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0
        )

    def step(self, outer_grads: ModuleStates, held: ModuleStates | None = None) -> None:
        """Apply one outer step to the modules in `outer_grads`.

        Modules absent from `outer_grads`, and coordinates where `held` is False, keep their value
        and their momentum.
        """
        partial = []
        for key, state in outer_grads.items():
            params = dict(self.model.module(key).named_parameters())
            for name, grad in state.items():
                p = params[name]
                if grad.shape != p.shape:
                    raise ValueError(
                        f"outer gradient {key}/{name}: shape {tuple(grad.shape)}, expected {tuple(p.shape)}"
                    )
                p.grad = grad.to(p.dtype).clone()
                mask = None if held is None else held.get(key, {}).get(name)
                if mask is not None and not bool(mask.all()):
                    buffer = self.sgd.state.get(p, {}).get("momentum_buffer")
                    partial.append((p, mask, p.detach().clone(), None if buffer is None else buffer.clone()))
        self.sgd.step()
        self.sgd.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, mask, old, old_buffer in partial:
                p.copy_(torch.where(mask, p, old))
                buffer = self.sgd.state[p].get("momentum_buffer")
                if buffer is not None:
                    buffer.copy_(torch.where(mask, buffer, 0.0 if old_buffer is None else old_buffer))

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers, for checkpoints."""
        return self.sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore momentum buffers saved by `state_dict`."""
        self.sgd.load_state_dict(state)
