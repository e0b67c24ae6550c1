"""DiLoCo outer step per module: Nesterov SGD on the outer gradients averaged over the paths that hold a
module (`fedmoe.aggregate`).
"""

from __future__ import annotations

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
