"""Sub-models for clients that hold part of a path: structured width slices and magnitude masks.

A mask is a bool tensor per parameter (True = the client holds and trains that coordinate); a
parameter without a mask is held whole. Width masks keep a fraction of the hidden units of every
hidden layer (a Linear whose outputs reach the next Linear through activations only): its rows and
the matching columns of the next layer. Which units: the first ones (HeteroFL, "static"), a window
that rolls by one unit per round (FedRolex, "rolling") or a fresh random subset each round
("random"). Magnitude masks keep the largest weights of each Linear (unstructured).
Both sides compute the same masks from (variant, round, seed, global weights): masks never travel.
A client of a width scheme trains the slices themselves (`width_slices`: the kept indices of every hidden
layer's parameters), a smaller dense model; the coordinator places its update back by the masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

Masks = dict[str, torch.Tensor]
# per parameter of a width sub-model: the indices it keeps along each dimension (None: all of them)
Slices = dict[str, tuple[torch.Tensor | None, ...]]
# rebuilt from (variant, round, seed) and shapes alone: usable over the network
WIDTH_SCHEMES = ("static", "rolling", "random")
SCHEMES = (*WIDTH_SCHEMES, "magnitude")
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU)


def hidden_layers(model: nn.Module) -> list[tuple[str, nn.Linear, str, nn.Linear]]:
    """(name, layer, next_name, next_layer) for each Linear whose outputs feed the next Linear through
    activations only.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    pairs = []
    for i, (name, layer) in enumerate(leaves):
        j = i + 1
        while j < len(leaves) and isinstance(leaves[j][1], ACTIVATIONS):
            j += 1
        if isinstance(layer, nn.Linear) and 1 < j - i and j < len(leaves):
            next_name, next_layer = leaves[j]
            if isinstance(next_layer, nn.Linear) and next_layer.in_features == layer.out_features:
                pairs.append((name, layer, next_name, next_layer))
    return pairs


def kept_units(
    width: int, density: float, scheme: str, round: int, generator: torch.Generator
) -> torch.Tensor:
    """Bool vector of the `ceil(density * width)` hidden units a client keeps this round."""
    k = max(1, math.ceil(density * width))
    if scheme == "static":
        index = torch.arange(k)
    elif scheme == "rolling":
        index = (round + torch.arange(k)) % width
    elif scheme == "random":
        index = torch.randperm(width, generator=generator)[:k]
    else:
        raise ValueError(f"unknown width scheme {scheme!r}; known: static, rolling, random")
    keep = torch.zeros(width, dtype=torch.bool)
    keep[index] = True
    return keep


def width_slices(
    model: nn.Module, density: float, scheme: str = "rolling", round: int = 0, seed: int = 0
) -> Slices:
    """The indices a client keeps of each parameter of `model`'s hidden layers (`density` of their units)."""
    check_density(density)
    if density == 1.0:
        return {}
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round)
    params = dict(model.named_parameters())
    slices: Slices = {}

    def keep(name: str, dim: int, index: torch.Tensor) -> None:
        kept = list(slices.get(name, (None,) * params[name].dim()))
        kept[dim] = index
        slices[name] = tuple(kept)

    for name, layer, next_name, _ in hidden_layers(model):
        index = kept_units(layer.out_features, density, scheme, round, generator).nonzero().flatten()
        keep(f"{name}.weight", 0, index)
        if layer.bias is not None:
            keep(f"{name}.bias", 0, index)
        keep(f"{next_name}.weight", 1, index)
    return slices


def sliced_shape(shape: torch.Size, kept: tuple[torch.Tensor | None, ...] | None) -> tuple[int, ...]:
    """The shape of a parameter of `shape` sliced to the indices `kept` (None: whole)."""
    kept = kept or (None,) * len(shape)
    return tuple(size if index is None else len(index) for size, index in zip(shape, kept))


def width_masks(
    model: nn.Module, density: float, scheme: str = "rolling", round: int = 0, seed: int = 0
) -> Masks:
    """Masks that keep `density` of the hidden units of every hidden layer of `model` (see `width_slices`)."""
    params = dict(model.named_parameters())
    masks: Masks = {}
    for name, kept in width_slices(model, density, scheme, round, seed).items():
        mask = torch.ones(params[name].shape, dtype=torch.bool)
        for dim, index in enumerate(kept):
            if index is not None:
                along = torch.zeros(mask.shape[dim], dtype=torch.bool)
                along[index] = True
                mask &= along.view([-1 if d == dim else 1 for d in range(mask.dim())])
        masks[name] = mask
    return masks


def reheld(
    t: torch.Tensor,
    old: tuple[torch.Tensor | None, ...],
    new: tuple[torch.Tensor | None, ...],
    shape: torch.Size,
) -> torch.Tensor:
    """`t`, held under the slices `old` of a parameter of `shape`, held under `new` instead: coordinates in
    both keep their values, the others start at zero (a width sub-model's optimiser state moving with its
    units from round to round)."""
    sources, targets, sizes = [], [], []
    for dim, size in enumerate(shape):
        was = torch.arange(size) if old[dim] is None else old[dim]
        now = torch.arange(size) if new[dim] is None else new[dim]
        position = torch.full((size,), -1, dtype=torch.long)
        position[was] = torch.arange(len(was))
        source = position[now]
        both = source >= 0
        view = [-1 if d == dim else 1 for d in range(len(shape))]
        sources.append(source[both].view(view).to(t.device))
        targets.append(torch.arange(len(now))[both].view(view).to(t.device))
        sizes.append(len(now))
    out = t.new_zeros(sizes)
    out[tuple(targets)] = t[tuple(sources)]
    return out


def magnitude_masks(model: nn.Module, density: float) -> Masks:
    """Masks that keep the `density` largest-magnitude weights of every Linear
    (torch.nn.utils.prune's L1 rule).
    """
    check_density(density)
    if density == 1.0:
        return {}
    rule = prune.L1Unstructured(amount=1.0 - density)
    return {
        f"{name}.weight": rule.compute_mask(m.weight.detach(), default_mask=torch.ones_like(m.weight)).bool()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def submodel_masks(model: nn.Module, density: float, scheme: str, round: int = 0, seed: int = 0) -> Masks:
    """The masks of one client's sub-model this round, by scheme (see the module docstring)."""
    if scheme == "magnitude":
        return magnitude_masks(model, density)
    return width_masks(model, density, scheme, round, seed)


def check_density(density: float) -> None:
    """Densities are fractions of a layer in (0, 1]."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def held_values(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The coordinates a client holds, as they travel:
    a dense sub-matrix for a width mask, else a flat vector.
    """
    if mask is None:
        return t
    if t.dim() == 2:
        rows, cols = mask.any(1), mask.any(0)
        if int(mask.sum()) == int(rows.sum()) * int(cols.sum()):  # rectangular: rows x cols
            return t[rows][:, cols]
    return t[mask]


def scatter_held(values: torch.Tensor, mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Inverse of `held_values`: a full tensor with the held coordinates filled in and zeros elsewhere."""
    if mask is None:
        return values.reshape(shape)
    full = torch.zeros(shape, dtype=values.dtype, device=values.device)
    full[mask.to(values.device)] = values.reshape(-1)
    return full


def held_shape(mask: torch.Tensor | None, shape: torch.Size) -> tuple[int, ...]:
    """Shape of `held_values` for a parameter of `shape` under `mask`."""
    return tuple(shape) if mask is None else tuple(held_values(mask, mask).shape)
