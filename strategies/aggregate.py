"""Heterogeneous aggregation: wire-form uploads in, per-module outer gradients (and coverage) out."""

from __future__ import annotations

from collections.abc import Sequence

from fedmoe.modular import ModularModel
from fedmoe.outer import ModuleStates, average_updates
from fedmoe.worker import Upload, decode


def aggregate(model: ModularModel, uploads: Sequence[Upload]) -> tuple[ModuleStates, ModuleStates]:
    """Dequantize each upload, then average every coordinate over the clients that hold it, weighted by shard size.

    `model` holds the weights the round started from. Returns (mean outer gradient, held): pass both
    to `OuterOptimizer.step`, which leaves coordinates that nobody held, and their momentum, as they were.
    """
    return average_updates([decode(model, upload) for upload in uploads])
