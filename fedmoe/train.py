"""The inner loop: H local AdamW steps on one shard. Every runner trains through `train_local`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class InnerConfig:
    """Local optimisation settings: steps per round (H), AdamW hyper-parameters, batch size."""

    steps: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    grad_clip: float = 1.0


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last axis: (N, C) for classifiers, (N, T, V) for language models."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def train_local(
    model: nn.Module,
    batches: Iterator[Batch],
    config: InnerConfig,
    optimizer_state: dict[str, Any] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Train `model` in place for `config.steps` steps; return the mean loss and the AdamW state.

    Passing the returned state back in the next round keeps the inner optimiser's moments across
    rounds, as DiLoCo workers do.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the state carries the old learning rate; this round's wins
            group["lr"] = config.lr
    model.train()
    total = 0.0
    for _ in range(config.steps):
        inputs, targets = next(batches)
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += loss.item()
    return total / max(config.steps, 1), optimizer.state_dict()
