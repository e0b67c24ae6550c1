"""Heterogeneous aggregation: wire-form uploads in, per-module outer gradients (and coverage) out.

Every rule works per coordinate over the clients that hold it (pruned clients hold part of a
module) after dequantizing, so masks and bit-widths mix freely:
- "mean": weighted by shard size (DiLoCo / FedAvg);
- "median": the coordinate-wise median;
- "trimmed-mean": drop the `trim` fraction of largest and of smallest values per coordinate, average the rest.
`clip_norm` first scales down every update whose outer-gradient norm is above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoe.modular import ModularModel
from fedmoe.outer import ModuleStates, Update, average_updates
from fedmoe.worker import Upload, decode

RULES = ("mean", "median", "trimmed-mean")


def aggregate(
    model: ModularModel,
    uploads: Sequence[Upload],
    rule: str = "mean",
    trim: float = 0.2,
    clip_norm: float | None = None,
) -> tuple[ModuleStates, ModuleStates]:
    """Dequantize each upload, then combine every coordinate over the clients that hold it
    (see the module docstring).

    `model` holds the weights the round started from. Returns (outer gradient, held): pass both to
    `OuterOptimizer.step`, which leaves coordinates that nobody held, and their momentum, as they were.
    """
    return combine([decode(model, upload) for upload in uploads], rule, trim, clip_norm)


def combine(
    updates: Sequence[Update], rule: str = "mean", trim: float = 0.2, clip_norm: float | None = None
) -> tuple[ModuleStates, ModuleStates]:
    """`aggregate` for updates already decoded (full-shaped outer gradients with their masks)."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    if clip_norm is not None:
        updates = [clipped(u, clip_norm) for u in updates]
    if rule == "mean":
        return average_updates(updates)
    return robust_average(updates, rule, trim)


def update_norm(update: Update) -> float:
    """L2 norm of an update's outer gradient over all its modules."""
    norms = [torch.linalg.vector_norm(t) for state in update.deltas.values() for t in state.values()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def clipped(update: Update, max_norm: float) -> Update:
    """The update scaled down to norm `max_norm` when it is larger."""
    norm = update_norm(update)
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    return Update(
        {k: {n: t * scale for n, t in s.items()} for k, s in update.deltas.items()},
        update.weight,
        update.masks,
    )


def robust_average(updates: Sequence[Update], rule: str, trim: float) -> tuple[ModuleStates, ModuleStates]:
    """Coordinate-wise median or trimmed mean over the updates that hold each coordinate (unweighted)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    stacks: dict[tuple[str, str], list[torch.Tensor]] = {}
    for update in updates:
        masks = update.masks or {}
        for key, state in update.deltas.items():
            for name, t in state.items():
                mask = masks.get(key, {}).get(name)
                stacks.setdefault((key, name), []).append(
                    t if mask is None else torch.where(mask, t, torch.nan)
                )
    result: ModuleStates = {}
    held: ModuleStates = {}
    for (key, name), tensors in stacks.items():
        values = torch.stack(tensors)  # (clients, ...) with NaN where a client does not hold the coordinate
        count = (~values.isnan()).sum(0)
        if rule == "median":
            combined = values.nanmedian(0).values
        else:
            ordered = values.sort(0).values  # NaN sorts last, so the held values come first
            cut = (count * trim).floor().long()
            rank = torch.arange(len(values)).view(-1, *([1] * (values.dim() - 1)))
            keep = (rank >= cut) & (rank < count - cut)
            combined = torch.where(keep, ordered, 0.0).sum(0) / keep.sum(0).clamp_min(1)
        result.setdefault(key, {})[name] = torch.where(count > 0, combined, 0.0).nan_to_num(0.0)
        held.setdefault(key, {})[name] = count > 0
    return result, held
