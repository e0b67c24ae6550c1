"""The routed ensemble: the router picks the top-k paths per example and their outputs are mixed.

Outputs mix as the spec says: probabilities (each expert's softmax, weighted) for classifiers and language
models, or values (raw outputs, weighted: velocities of flow models). A checkpoint records the spec's import
string and the grid, so `Ensemble.load` rebuilds the model through the spec.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch

from fedmoe.checkpoint import load_checkpoint, save_checkpoint
from fedmoe.modular import ModularModel, Path, flatten_states, unflatten_states
from fedmoe.router import Router, router_from_state
from fedmoe.spec import Examples, Spec, load_spec


@dataclass(frozen=True)
class Prediction:
    """Mixed output per example (probabilities or values), and which experts ran with what weight."""

    outputs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


class Ensemble:
    """Paths of a trained grid plus a router; expert k is `paths[k]`."""

    def __init__(
        self,
        spec: Spec,
        model: ModularModel,
        paths: Sequence[Path],
        router: Router,
        grid: Sequence[int] | None = None,
    ):
        if len(paths) != router.n_experts:
            raise ValueError(f"{len(paths)} paths but the router knows {router.n_experts} experts")
        self.spec, self.model, self.paths, self.router = spec, model, list(paths), router
        self.grid = tuple(grid) if grid is not None else model.grid
        self.experts = [model.compose(path).eval() for path in self.paths]

    @torch.no_grad()
    def predict(
        self,
        inputs: torch.Tensor,
        top_k: int | None = None,
        features: torch.Tensor | None = None,
        draw: torch.Generator | None = None,
        gumbel: torch.Tensor | None = None,
    ) -> Prediction:
        """Mix the outputs of the top-k experts (all of them when top_k is None).

        Routing features are `spec.featurize(inputs)` unless given. Each expert runs only on the examples
        routed to it; mixture weights are the router's probabilities renormalised over the chosen experts.
        With `draw`, each example instead runs one expert drawn from the router's distribution (weight 1);
        with `gumbel` (N, n_experts standard Gumbel noise), the expert of largest log probability plus its
        noise (weight 1): also a draw from the router's distribution, and with the same noise over several
        calls the expert changes only where the distribution moves past it (Gumbel-max).
        """
        k = len(self.experts) if top_k is None else top_k
        if not 1 <= k <= len(self.experts):
            raise ValueError(f"top_k must be in 1..{len(self.experts)}, got {top_k}")
        features = self.spec.featurize(inputs) if features is None else features
        route = self.router.probs(torch.as_tensor(features, dtype=torch.float32))
        if draw is not None:
            experts = torch.multinomial(route, 1, generator=draw)
            weights = torch.ones(experts.shape)
        elif gumbel is not None:
            experts = (route.clamp_min(1e-30).log() + gumbel).argmax(-1, keepdim=True)
            weights = torch.ones(experts.shape)
        else:
            weights, experts = route.topk(k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        mixed: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            rows, slot = (experts == e).nonzero(as_tuple=True)
            if len(rows) == 0:
                continue
            out = self.spec.outputs(expert(inputs[rows]))
            if mixed is None:
                mixed = torch.zeros((len(inputs), *out.shape[1:]))
            w = weights[rows, slot].view(-1, *([1] * (out.dim() - 1)))
            mixed.index_add_(0, rows, w * out)
        assert mixed is not None
        return Prediction(mixed, experts, weights)

    def score(self, examples: Examples, top_k: int | None = 1) -> dict[str, float]:
        """The spec's metrics of the routed top-k mixture on `examples` (prepared with a fixed seed)."""
        examples = self.spec.prepared(examples)
        return self.spec.metrics(self.predict(examples.inputs, top_k).outputs, examples.targets)

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> FsPath:
        """Write grid, paths and router to one checkpoint directory, naming the spec by its import string."""
        if not self.spec.ref:
            raise ValueError(
                f"spec {self.spec.name!r} has no import string: load it with "
                "fedmoe.load_spec('pkg.mod:attr') to save"
            )
        tensors = {f"model/{k}": v for k, v in flatten_states(self.model.module_states()).items()}
        tensors |= {f"router/{k}": v for k, v in self.router.tensors().items()}
        manifest = {
            "kind": "ensemble",
            "spec": self.spec.ref,
            "grid": list(self.grid),
            "paths": [str(p) for p in self.paths],
            "router": self.router.config(),
            **(extra or {}),
        }
        return save_checkpoint(directory, tensors, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike, spec: Spec | str | None = None) -> Ensemble:
        """Rebuild an ensemble written by `save`, through its recorded spec (or the one given)."""
        tensors, manifest = load_checkpoint(directory)
        if manifest.get("kind") != "ensemble":
            raise ValueError(f"{directory} holds a {manifest.get('kind')!r} checkpoint, not an ensemble")
        spec = load_spec(spec or manifest["spec"])
        model = spec.build(manifest["grid"])
        states = unflatten_states({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        expected = {k: {n: tuple(p.shape) for n, p in s.items()} for k, s in model.module_states().items()}
        found = {k: {n: tuple(t.shape) for n, t in s.items()} for k, s in states.items()}
        if expected != found:
            raise ValueError(
                f"{directory}: the checkpoint's weights do not fit spec {spec.ref or spec.name!r} on grid "
                f"{manifest['grid']} ({describe_mismatch(expected, found)})"
            )
        model.load_module_states(states)
        router = router_from_state(
            manifest["router"], {k[7:]: v for k, v in tensors.items() if k.startswith("router/")}
        )
        return cls(spec, model, [Path.parse(p) for p in manifest["paths"]], router, manifest["grid"])


def describe_mismatch(
    expected: dict[str, dict[str, tuple]], found: dict[str, dict[str, tuple]], most: int = 5
) -> str:
    """Which parameters differ between two {module: {name: shape}} descriptions, briefly."""
    flat_e = {f"{k}/{n}": s for k, d in expected.items() for n, s in d.items()}
    flat_f = {f"{k}/{n}": s for k, d in found.items() for n, s in d.items()}
    lines = [f"{n}: missing" for n in flat_e if n not in flat_f]
    lines += [f"{n}: unexpected" for n in flat_f if n not in flat_e]
    lines += [
        f"{n}: shape {flat_f[n]} vs {flat_e[n]}" for n in flat_e if n in flat_f and flat_f[n] != flat_e[n]
    ]
    more = f", and {len(lines) - most} more" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more
