"""Shared builders: small grids of the built-in model families, as a user's spec would make them."""

from __future__ import annotations

from fedmoe.models.classifier import mlp_levels
from fedmoe.models.lm import byte_transformer_levels
from fedmoe.modular import ModularModel
from fedmoe.spec import Spec


def mlp_grid(grid: tuple[int, ...], seed: int = 0, **config) -> ModularModel:
    """A grid of the MLP classifier family (in 64, hidden 128, depth 2, 10 classes unless given)."""
    return Spec("mlp", mlp_levels(**config)).build(grid, seed)


def lm_grid(grid: tuple[int, ...], seed: int = 0, **config) -> ModularModel:
    """A grid of the byte-level transformer family."""
    return Spec("byte-lm", byte_transformer_levels(**config)).build(grid, seed)
