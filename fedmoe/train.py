"""The inner loop: H local steps of the spec's optimiser on one client's data. Every runner trains through
`train_local`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedmoe.config import InnerConfig
from fedmoe.spec import Batch, cross_entropy

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where a client trains and in what precision: a torch device, and the dtype training runs under
    autocast (None: fp32). Weights, optimiser state, outer gradients and everything the coordinator sees
    stay fp32."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None

    @classmethod
    def of(cls, device: str = "auto", precision: str = "fp32") -> Compute:
        """`device`: "auto" (cuda if present, else mps, else cpu) or a torch device ("cuda:1"); `precision`:
        "fp32", "bf16" or "fp16" (CUDA only). ValueError naming the fix for one this machine lacks."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device == "auto":
            device = (
                "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
            )
        try:
            chosen = torch.device(device)
        except RuntimeError as e:
            raise ValueError(
                f"unknown device {device!r} ({e}): give auto, cpu, cuda, cuda:N or mps"
            ) from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(chosen.type, False):
            raise ValueError(f"device {device!r} is not available on this machine: give auto or cpu")
        if precision == "fp16" and chosen.type != "cuda":
            raise ValueError("fp16 training needs a CUDA device (it scales the loss); use bf16 on a CPU")
        return cls(chosen, PRECISIONS[precision])


def train_local(
    model: nn.Module,
    batches: Iterator[Batch],
    config: InnerConfig,
    optimizer_state: dict[str, Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    compute: Compute | None = None,
) -> tuple[float, dict[str, Any]]:
    """Train `model` in place for `config.steps` steps; return the mean loss and the optimiser's state.

    Passing the returned state back in the next round keeps the inner optimiser's moments across
    rounds, as DiLoCo workers do. `config.lr` is this round's learning rate (already scheduled). The model
    must be on `compute.device` (default: the CPU); batches move there, and the forward pass and loss run
    under autocast to `compute.autocast` (fp16 with a gradient scaler).
    """
    compute = compute or Compute()
    device, dtype = compute.device, compute.autocast
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    opt = optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:  # the state carries the old learning rate; this round's wins
            group["lr"] = config.lr
    model.train()
    total = torch.zeros((), device=device)
    for _ in range(config.steps):
        inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        total += loss.detach().float()  # summed on the device: no synchronisation per step
    return float(total) / max(config.steps, 1), opt.state_dict()
