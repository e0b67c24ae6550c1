"""Heterogeneous aggregation: wire-form uploads in, per-module outer gradients (and coverage) out.

Every rule works per coordinate over the clients that hold it (pruned clients hold part of a
module) after dequantizing, so masks and bit-widths mix freely:
- "mean": weighted by shard size (DiLoCo / FedAvg);
- "median": the coordinate-wise median;
- "trimmed-mean": drop the `trim` fraction of largest and of smallest values per coordinate, average the rest.
`clip_norm` first scales down every update whose outer-gradient norm is above it.

`Aggregation` combines updates as they arrive (the coordinator folds in each update once it is durable): the
mean keeps a running weighted sum per parameter, so its memory is that of the grid whatever the number of
updates; the median and the trimmed mean need every value of a coordinate and keep each update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoe.modular import ModularModel
from fedmoe.outer import ModuleStates, Update
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
    aggregation = Aggregation(rule, trim, clip_norm)
    for update in updates:
        aggregation.add(update)
    return aggregation.result()


class Aggregation:
    """Updates combined one at a time as they arrive (`add`), by `rule` after clipping to `clip_norm`;
    `result` is the weighted mean over the updates holding each coordinate (or `robust_average` of them),
    bit for bit what computing it from all the updates at once in the same order gives.

    The mean keeps per parameter a running sum of weight x outer gradient and the weight summed per
    coordinate (a single number while every update held the parameter whole): its memory is one grid,
    whatever the number of updates. The median and the trimmed mean need every value of a coordinate: they
    keep each (clipped) update, one grid per update.
    """

    def __init__(self, rule: str = "mean", trim: float = 0.2, clip_norm: float | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.rule, self.trim, self.clip_norm = rule, trim, clip_norm
        self.sums: ModuleStates = {}  # the mean: per parameter, the sum of weight x outer gradient
        self.totals: ModuleStates = {}  # and the weight summed per coordinate (0-d while held whole)
        self.kept: list[Update] = []  # the median and the trimmed mean: every update
        self.counts: dict[str, int] = {}  # per module, the updates that hold it

    def add(self, update: Update) -> None:
        """Fold in one update (ValueError for a weight that is not positive)."""
        if not update.weight > 0:
            raise ValueError(f"update weight must be positive, got {update.weight}")
        if self.clip_norm is not None:
            update = clipped(update, self.clip_norm)
        for key in update.deltas:
            self.counts[key] = self.counts.get(key, 0) + 1
        if self.rule != "mean":
            self.kept.append(update)
            return
        masks, weight = update.masks or {}, update.weight
        for key, state in update.deltas.items():
            sums, totals = self.sums.setdefault(key, {}), self.totals.setdefault(key, {})
            for name, t in state.items():
                mask = masks.get(key, {}).get(name)
                if mask is None and name in sums and totals[name].dim() == 0:  # held whole, so far and now
                    sums[name] += t * weight
                    totals[name].add_(weight)
                    continue
                weights = torch.tensor(weight, dtype=t.dtype) if mask is None else mask.to(t.dtype) * weight
                if name not in sums:
                    sums[name], totals[name] = weights * t, weights
                else:
                    sums[name] += weights * t
                    totals[name] = totals[name] + weights

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it holds."""
        held = [*self.sums.values(), *self.totals.values()]
        for update in self.kept:
            held += [*update.deltas.values(), *(update.masks or {}).values()]
        return sum(t.nbytes for state in held for t in state.values())

    def result(self) -> tuple[ModuleStates, ModuleStates]:
        """(outer gradient, held) per module: pass both to `OuterOptimizer.step`, which leaves coordinates
        that no update held, and their momentum, as they were."""
        if self.rule != "mean":
            return robust_average(self.kept, self.rule, self.trim)
        mean: ModuleStates = {}
        held: ModuleStates = {}
        for key, sums in self.sums.items():
            for name, s in sums.items():
                total = self.totals[key][name]
                mean.setdefault(key, {})[name] = torch.where(total > 0, s / total.clamp_min(1e-30), 0.0)
                held.setdefault(key, {})[name] = (total > 0).expand(s.shape).clone()
        return mean, held


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
