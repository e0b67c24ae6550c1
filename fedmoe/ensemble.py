"""The routed ensemble: the router picks the top-k paths per example and their output distributions are mixed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn.functional as F

from fedmoe.checkpoint import load_checkpoint, save_checkpoint
from fedmoe.modular import ModularModel, Path, flatten_states, unflatten_states
from fedmoe.models import ModelSpec
from fedmoe.router import Router, router_from_state


@dataclass(frozen=True)
class Prediction:
    """Mixed output distribution per example, and which experts ran with what weight."""

    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


class Ensemble:
    """Paths of a trained grid plus a router; expert k is `paths[k]`."""

    def __init__(self, spec: ModelSpec, model: ModularModel, paths: Sequence[Path], router: Router):
        if len(paths) != router.n_experts:
            raise ValueError(f"{len(paths)} paths but the router knows {router.n_experts} experts")
        self.spec, self.model, self.paths, self.router = spec, model, list(paths), router
        self.experts = [model.compose(path).eval() for path in self.paths]

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, features: torch.Tensor, top_k: int | None = None) -> Prediction:
        """Mix the softmax outputs of the top-k experts (all of them when top_k is None).

        Each expert runs only on the examples routed to it; mixture weights are the router's
        probabilities renormalised over the chosen experts.
        """
        k = len(self.experts) if top_k is None else top_k
        if not 1 <= k <= len(self.experts):
            raise ValueError(f"top_k must be in 1..{len(self.experts)}, got {top_k}")
        route = self.router.probs(torch.as_tensor(features, dtype=torch.float32))
        weights, experts = route.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        mixed: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            rows, slot = (experts == e).nonzero(as_tuple=True)
            if len(rows) == 0:
                continue
            probs = F.softmax(expert(inputs[rows]).float(), dim=-1)
            if mixed is None:
                mixed = torch.zeros((len(inputs), *probs.shape[1:]))
            w = weights[rows, slot].view(-1, *([1] * (probs.dim() - 1)))
            mixed.index_add_(0, rows, w * probs)
        assert mixed is not None
        return Prediction(mixed, experts, weights)

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> FsPath:
        """Write grid, paths and router to one checkpoint directory."""
        tensors = {f"model/{k}": v for k, v in flatten_states(self.model.module_states()).items()}
        tensors |= {f"router/{k}": v for k, v in self.router.tensors().items()}
        manifest = {
            "kind": "ensemble",
            "model": self.spec.to_dict(),
            "paths": [str(p) for p in self.paths],
            "router": self.router.config(),
            **(extra or {}),
        }
        return save_checkpoint(directory, tensors, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Ensemble:
        """Rebuild an ensemble written by `save`."""
        tensors, manifest = load_checkpoint(directory)
        if manifest.get("kind") != "ensemble":
            raise ValueError(f"{directory} holds a {manifest.get('kind')!r} checkpoint, not an ensemble")
        spec = ModelSpec.from_dict(manifest["model"])
        model = spec.build()
        model.load_module_states(unflatten_states({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}))
        router = router_from_state(manifest["router"], {k[7:]: v for k, v in tensors.items() if k.startswith("router/")})
        return cls(spec, model, [Path.parse(p) for p in manifest["paths"]], router)
