"""Model families, each built as a `ModularModel` grid, and a registry to rebuild them from config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmoe.modular import ModularModel
from fedmoe.models.classifier import mlp_classifier
from fedmoe.models.lm import byte_transformer

FAMILIES: dict[str, Callable[..., ModularModel]] = {
    "mlp": mlp_classifier,
    "byte-lm": byte_transformer,
}


def build_model(family: str, grid: Sequence[int], seed: int = 0, **config: Any) -> ModularModel:
    """Build a grid of the named family; the same (family, grid, seed, config) gives the same weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return FAMILIES[family](tuple(grid), **config)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a grid: family name, modules per level, family settings."""

    family: str
    grid: tuple[int, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> ModularModel:
        """A freshly initialised grid."""
        return build_model(self.family, self.grid, seed=seed, **self.config)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for manifests."""
        return {"family": self.family, "grid": list(self.grid), "config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`."""
        return cls(data["family"], tuple(data["grid"]), dict(data["config"]))


__all__ = ["FAMILIES", "ModelSpec", "build_model", "byte_transformer", "mlp_classifier"]
