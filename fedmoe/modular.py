"""Levels x modules: the grid that experts and paths are cut from.

A `ModularModel` holds, for each level, a list of interchangeable modules. A `Path` picks one module
per level; `compose` chains them into one `nn.Module`. Independent experts (c-BTM, Decentralized
Diffusion Models) are the one-level case: each module is a whole model and each path holds one.
DiPaCo is the many-level case: modules are shared by every path that passes through them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, order=True)
class Path:
    """One module index per level, e.g. Path((0, 2)) takes module 0 of level 0 and 2 of level 1."""

    modules: tuple[int, ...]

    def module_keys(self) -> list[str]:
        """The keys ("level.index") of the modules this path passes through."""
        return [module_key(level, index) for level, index in enumerate(self.modules)]

    def __str__(self) -> str:
        return "-".join(str(i) for i in self.modules)

    @classmethod
    def parse(cls, text: str) -> Path:
        """Inverse of str(): "0-2" -> Path((0, 2))."""
        return cls(tuple(int(part) for part in text.split("-")))


def module_key(level: int, index: int) -> str:
    """The name of module `index` of `level`, used in state dicts and on the wire."""
    return f"{level}.{index}"


class ModularModel(nn.Module):
    """A grid of modules: `levels[l][m]` is module m of level l."""

    def __init__(self, levels: Sequence[Sequence[nn.Module]]):
        super().__init__()
        if not levels or any(len(level) == 0 for level in levels):
            raise ValueError("a modular model needs at least one level and one module per level")
        self.levels = nn.ModuleList(nn.ModuleList(level) for level in levels)

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of modules per level."""
        return tuple(len(level) for level in self.levels)

    def paths(self) -> list[Path]:
        """Every path through the grid, in lexicographic order."""
        return [Path(p) for p in itertools.product(*(range(n) for n in self.grid))]

    def module(self, key: str) -> nn.Module:
        """The module named `key` ("level.index")."""
        level, index = (int(part) for part in key.split("."))
        return self.levels[level][index]

    def module_keys(self) -> list[str]:
        """Keys of every module in the grid."""
        return [module_key(level, m) for level, n in enumerate(self.grid) for m in range(n)]

    def compose(self, path: Path) -> nn.Sequential:
        """The path as one model. Shares parameters with the grid; deep-copy it to train in isolation."""
        if len(path.modules) != len(self.levels):
            raise ValueError(f"path {path} has {len(path.modules)} levels, the grid has {len(self.levels)}")
        for level, (index, n) in enumerate(zip(path.modules, self.grid)):
            if not 0 <= index < n:
                raise ValueError(f"path {path}: level {level} has modules 0..{n - 1}, not {index}")
        return nn.Sequential(*(self.levels[level][m] for level, m in enumerate(path.modules)))

    def module_states(self, keys: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Detached copies of the parameters of the given modules (all by default), per module key."""
        keys = self.module_keys() if keys is None else keys
        return {key: {n: p.detach().clone() for n, p in self.module(key).named_parameters()} for key in keys}

    def load_module_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy parameters into the named modules (in place, so optimisers keep their references)."""
        with torch.no_grad():
            for key, state in states.items():
                params = dict(self.module(key).named_parameters())
                for name, value in state.items():
                    params[name].copy_(value)


def flatten_states(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module: {param: t}} -> {"module/param": t}, the flat form stored in checkpoints."""
    return {f"{key}/{name}": t for key, state in states.items() for name, t in state.items()}


def unflatten_states(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of `flatten_states`."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in flat.items():
        key, name = full.split("/", 1)
        states.setdefault(key, {})[name] = t
    return states


def split_evenly(items: Sequence, parts: int) -> Iterator[list]:
    """Split a sequence into `parts` contiguous chunks whose sizes differ by at most one."""
    if not 1 <= parts <= len(items):
        raise ValueError(f"cannot split {len(items)} items into {parts} levels")
    q, r = divmod(len(items), parts)
    start = 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        yield list(items[start:end])
        start = end
