"""Routers map an example's features to a distribution over experts (paths)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Router(Protocol):
    """Anything with `probs(features) -> (N, K)` and a serialisable state."""

    n_experts: int

    def probs(self, features: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def config(self) -> dict[str, Any]: ...


class CentroidRouter:
    """c-BTM routing: softmax(-(||f - c_k||^2 + p_k) / T) over the cluster centroids c_k.

    `prices` p_k (zeros by default) are balanced k-means' per-cluster offsets; the temperature T is best
    on the data's own scale (`FederatedKMeans.temperature`: the mean squared distance to a centroid).
    """

    def __init__(
        self, centroids: np.ndarray | torch.Tensor, temperature: float = 0.1, prices: np.ndarray | None = None
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        self.temperature = temperature
        self.n_experts = self.centroids.shape[0]
        self.prices = (
            torch.zeros(self.n_experts) if prices is None else torch.as_tensor(prices, dtype=torch.float32)
        )

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Routing distribution for each row of `features`."""
        d2 = torch.cdist(torch.as_tensor(features, dtype=torch.float32), self.centroids).square()
        return F.softmax(-(d2 + self.prices) / self.temperature, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint."""
        return {"centroids": self.centroids, "prices": self.prices}

    def config(self) -> dict[str, Any]:
        """Settings to checkpoint."""
        return {"kind": "centroid", "temperature": self.temperature}


class LearnedRouter(nn.Module):
    """A small MLP trained to predict which shard an example belongs to."""

    def __init__(self, in_dim: int, n_experts: int, hidden: int = 64):
        super().__init__()
        self.in_dim, self.n_experts, self.hidden = in_dim, n_experts, hidden
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_experts))

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        steps: int = 500,
        lr: float = 3e-3,
        batch_size: int = 128,
        seed: int = 0,
    ) -> float:
        """Train on (features, shard label) pairs; return the final training accuracy."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
        self.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
            loss = F.cross_entropy(self.net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.eval()
        with torch.no_grad():
            return (self.net(x).argmax(-1) == y).float().mean().item()

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Routing distribution for each row of `features`."""
        return F.softmax(self.net(torch.as_tensor(features, dtype=torch.float32)), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def config(self) -> dict[str, Any]:
        """Settings to checkpoint."""
        return {"kind": "learned", "in_dim": self.in_dim, "n_experts": self.n_experts, "hidden": self.hidden}


def shard_labels(shards: list[np.ndarray], n: int) -> np.ndarray:
    """The shard index of each of n units, from a partition."""
    labels = np.full(n, -1, dtype=np.int64)
    for k, idx in enumerate(shards):
        labels[idx] = k
    if (labels < 0).any():
        raise ValueError("the shards do not cover every unit")
    return labels


def router_from_state(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> CentroidRouter | LearnedRouter:
    """Rebuild a router saved with `tensors()` and `config()`."""
    kind = config["kind"]
    if kind == "centroid":
        prices = tensors["prices"].numpy() if "prices" in tensors else None
        return CentroidRouter(tensors["centroids"].numpy(), config["temperature"], prices)
    if kind == "learned":
        router = LearnedRouter(config["in_dim"], config["n_experts"], config["hidden"])
        router.load_state_dict(tensors)
        router.eval()
        return router
    if kind == "flow":
        from fedmoe.flow import FlowRouter  # flow models build on the ensemble, which builds on routers

        return FlowRouter(
            tensors["log_weights"], tensors["means"], tensors["variances"], tensors.get("bases")
        )
    raise ValueError(f"unknown router kind {kind!r}")
