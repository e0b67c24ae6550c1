"""Shared builders: small grids of the built-in model families, as a user's spec would make them.

Every coordinator and client the tests start, in this process or as a subprocess, enrols with the operator's
token in $FEDMOE_ENROLMENT_TOKEN, as a deployment that sets it does; tests/test_hardening.py checks joins
without it, with a wrong one, and with the token file a coordinator makes in its state directory.
"""

from __future__ import annotations

import os

from fedmoe.models.classifier import mlp_levels
from fedmoe.models.lm import byte_transformer_levels
from fedmoe.modular import ModularModel
from fedmoe.security import ENROLMENT_ENV
from fedmoe.spec import Spec

ENROLMENT = "tests-enrolment-token-0123456789abcdef"
os.environ[ENROLMENT_ENV] = ENROLMENT


def mlp_grid(grid: tuple[int, ...], seed: int = 0, **config) -> ModularModel:
    """A grid of the MLP classifier family (in 64, hidden 128, depth 2, 10 classes unless given)."""
    return Spec("mlp", mlp_levels(**config)).build(grid, seed)


def lm_grid(grid: tuple[int, ...], seed: int = 0, **config) -> ModularModel:
    """A grid of the byte-level transformer family."""
    return Spec("byte-lm", byte_transformer_levels(**config)).build(grid, seed)
