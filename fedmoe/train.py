"""The inner loop: H local steps of the spec's optimiser on one client's data. Every runner trains through
`train_local`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fedmoe.config import InnerConfig
from fedmoe.spec import Batch, cross_entropy


def train_local(
    model: nn.Module,
    batches: Iterator[Batch],
    config: InnerConfig,
    optimizer_state: dict[str, Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
) -> tuple[float, dict[str, Any]]:
    """Train `model` in place for `config.steps` steps; return the mean loss and the optimiser's state.

    Passing the returned state back in the next round keeps the inner optimiser's moments across
    rounds, as DiLoCo workers do. `config.lr` is this round's learning rate (already scheduled).
    """
    opt = optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:  # the state carries the old learning rate; this round's wins
            group["lr"] = config.lr
    model.train()
    total = 0.0
    for _ in range(config.steps):
        inputs, targets = next(batches)
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        total += loss.item()
    return total / max(config.steps, 1), opt.state_dict()
