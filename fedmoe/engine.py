"""The round engine: one implementation of a federation's rounds, driven by every runner.

`Engine` owns the grid and the round counter. It assigns each client a path (load balance over the
paths, in enrolment order) and a variant (the densest its device profile fits), makes what a client
receives each round (`job`), decodes and checks what it sends back (`decode`), aggregates a round's
updates with the configured rule and takes the DiLoCo outer step (`close_round`), and builds the routed
ensemble from federated feature statistics (each client's sum and count of routing features, never
its data). The in-process runner (`fedmoe.federation`), the gRPC coordinator (`fedmoe.server`) and the
Flower strategy (`fedmoe.strategies.flower`) are thin drivers around it: they differ in transport,
membership and persistence, not in the algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.aggregate import combine
from fedmoe.assignment import DeviceProfile, assign_variant
from fedmoe.config import Config, InnerConfig, resolve_outer
from fedmoe.ensemble import Ensemble
from fedmoe.modular import ModularModel, Path
from fedmoe.outer import OuterOptimizer, Update
from fedmoe.router import CentroidRouter
from fedmoe.spec import Examples, Spec
from fedmoe.worker import Job, Upload, Variant, decode, make_job

log = logging.getLogger("fedmoe.engine")
NETWORK_SCHEMES = ("rolling", "static", "random")


@dataclass(frozen=True)
class Assignment:
    """A client's place in the federation: the path it trains, the variant it holds, its seed (masks,
    batches).
    """

    path: Path
    variant: Variant
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for state files and messages."""
        v = self.variant
        return {
            "path": str(self.path),
            "bits": v.bits,
            "density": v.density,
            "scheme": v.scheme,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assignment:
        """Inverse of `to_dict`."""
        return cls(
            Path.parse(d["path"]),
            Variant(int(d["bits"]), float(d["density"]), str(d["scheme"])),
            int(d["seed"]),
        )


class Engine:
    """A federation's rounds over the grid of `spec` (see the module docstring)."""

    def __init__(self, spec: Spec, config: Config):
        self.spec, self.config = spec, config
        self.model: ModularModel = spec.build(config.grid, config.seed)
        self.paths = self.model.paths()
        self.round = 0
        self.assignments: dict[str, Assignment] = {}
        self.outer = OuterOptimizer(self.model, lr=1.0, momentum=0.0)
        self.outer_choice: tuple[float, float] | None = None  # (lr, momentum), fixed at the first outer step
        # per client: sum of its routing features, and its count
        self.feature_sums: dict[str, np.ndarray] = {}
        self.feature_counts: dict[str, float] = {}
        self._eval: Examples | None = None

    @property
    def finished(self) -> bool:
        """All rounds are done."""
        return self.round >= self.config.rounds

    # -- clients ----------------------------------------------------------------------------
    def assign(self, client_id: str, profile: DeviceProfile) -> Assignment:
        """Give a new client the least-loaded path (lowest index on ties)
        and the densest variant its profile fits.

        Raises ValueError when the profile cannot hold a path at any density it accepts.
        """
        load = {path: 0 for path in self.paths}
        for a in self.assignments.values():
            load[a.path] += 1
        path = min(self.paths, key=lambda p: (load[p], p))
        variant = assign_variant(profile, self.model.compose(path), self.config.compression.scheme)
        assignment = Assignment(path, variant, self.config.seed + len(self.assignments))
        self.assignments[client_id] = assignment
        return assignment

    def inner(self, round: int) -> InnerConfig:
        """The inner settings of round `round`, its learning rate scheduled over the run."""
        inner = self.config.inner
        return inner.model_copy(update={"lr": inner.lr_at(round, self.config.rounds)})

    def job(self, client_id: str) -> Job:
        """What `client_id` receives for the open round:
        its path's weights as its variant holds them, and how to train.
        """
        a = self.assignments[client_id]
        return make_job(self.model, a.path, a.variant, self.round, a.seed, self.inner(self.round))

    def check(self, client_id: str, upload: Upload) -> None:
        """Raise ValueError unless `upload` is for this client's path, variant and seed."""
        a = self.assignments[client_id]
        if (upload.path, upload.variant, upload.seed) != (a.path, a.variant, a.seed):
            raise ValueError(
                f"update is for path {upload.path} {upload.variant}, the assignment is {a.path} {a.variant}"
            )

    def decode(self, client_id: str, upload: Upload) -> Update:
        """Check an upload against the client's assignment and the grid,
        and turn it into per-module outer gradients.
        """
        self.check(client_id, upload)
        return decode(self.model, upload)

    def add_features(self, client_id: str, feature_sum: np.ndarray, count: float) -> None:
        """Record a client's routing statistics: the sum of its examples' feature vectors and their number."""
        feature_sum = np.asarray(feature_sum, dtype=np.float64).reshape(-1)
        if not np.isfinite(feature_sum).all() or not np.isfinite(count) or count <= 0:
            raise ValueError(f"feature statistics must be finite with a positive count, got count {count}")
        widths = {len(s) for s in self.feature_sums.values()}
        if widths and len(feature_sum) not in widths:
            raise ValueError(f"{len(feature_sum)} routing features, the other clients sent {widths.pop()}")
        self.feature_sums[client_id], self.feature_counts[client_id] = feature_sum, float(count)

    # -- rounds -----------------------------------------------------------------------------
    def round_due(self, pending: int, members: int, elapsed_s: float) -> bool:
        """Whether the open round closes now: the quorum of `members` sent,
        or the deadline passed with at least one update.
        """
        if self.finished or pending == 0:
            return False
        policy = self.config.policy
        quorum = max(1, int(np.ceil(policy.quorum * members)))
        return pending >= quorum or elapsed_s >= policy.deadline_s

    def close_round(self, uploads: Sequence[Upload], updates: Sequence[Update]) -> dict[str, Any]:
        """Aggregate the round's updates with the configured rule, take the outer step, open the next round.

        The first call fixes the outer step's lr and momentum by `resolve_outer`. Returns the round's metrics:
        updates, mean inner loss, upload bytes, and the ensemble's metrics on the spec's eval set when it has
        one.
        """
        if not updates:
            raise ValueError("a round closes with at least one update")
        if self.outer_choice is None:
            per_module: dict[str, int] = {}
            for update in updates:
                for key in update.deltas:
                    per_module[key] = per_module.get(key, 0) + 1
            self.set_outer(*resolve_outer(self.config.outer, max(per_module.values())))
        agg = self.config.aggregation
        self.outer.step(*combine(updates, agg.rule, agg.trim, agg.clip_norm))
        metrics: dict[str, Any] = {
            "round": self.round + 1,
            "updates": len(updates),
            "loss": float(np.mean([u.loss for u in uploads])),
            "upload_bytes": sum(u.nbytes for u in uploads),
        }
        self.round += 1
        if self.spec.eval_data is not None and self.feature_counts:
            metrics.update(self.evaluate())
        return metrics

    def set_outer(self, lr: float, momentum: float) -> None:
        """Fix the outer step's learning rate and momentum (Nesterov when configured and momentum > 0)."""
        self.outer_choice = (lr, momentum)
        for group in self.outer.sgd.param_groups:
            group.update(lr=lr, momentum=momentum, nesterov=self.config.outer.nesterov and momentum > 0)

    # -- the ensemble -----------------------------------------------------------------------
    def centroids(self) -> tuple[list[Path], np.ndarray]:
        """The paths that clients reported features for, and each one's centroid
        (the mean feature of its clients' data).
        """
        sums: dict[Path, np.ndarray] = {}
        counts: dict[Path, float] = {}
        for client_id, s in self.feature_sums.items():
            path = self.assignments[client_id].path
            sums[path] = sums.get(path, 0.0) + s
            counts[path] = counts.get(path, 0.0) + self.feature_counts[client_id]
        paths = [p for p in self.paths if p in counts]
        if not paths:
            raise ValueError("no client has reported routing statistics yet")
        return paths, np.stack([sums[p] / counts[p] for p in paths]).astype(np.float32)

    def ensemble(self) -> Ensemble:
        """The trained paths with a centroid router over the federated centroids
        (paths nobody trained are left out).
        """
        paths, centroids = self.centroids()
        return Ensemble(self.spec, self.model, paths, CentroidRouter(centroids), self.config.grid)

    def evaluate(self, top_k: int = 1) -> dict[str, float]:
        """The routed top-k ensemble's metrics on the spec's server-side eval set (empty without one)."""
        if self.spec.eval_data is None:
            return {}
        if self._eval is None:
            self._eval = self.spec.eval_data()
        return self.ensemble().score(self._eval, top_k)

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The grid's weights and outer momentum, flat, for checkpoints."""
        tensors = {}
        for key in self.model.module_keys():
            for name, p in self.model.module(key).named_parameters():
                tensors[f"model/{key}/{name}"] = p.detach()
                buffer = self.outer.sgd.state.get(p, {}).get("momentum_buffer")
                if buffer is not None:
                    tensors[f"momentum/{key}/{name}"] = buffer
        return tensors

    def state_manifest(self) -> dict[str, Any]:
        """The round, the outer step's choice, assignments and routing statistics, as JSON."""
        return {
            "round": self.round,
            "outer": self.outer_choice,
            "assignments": {c: a.to_dict() for c, a in self.assignments.items()},
            "features": {
                c: [self.feature_sums[c].tolist(), self.feature_counts[c]] for c in self.feature_sums
            },
        }

    def load_state(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Restore what `state_tensors` and `state_manifest` saved."""
        with torch.no_grad():
            for key in self.model.module_keys():
                for name, p in self.model.module(key).named_parameters():
                    p.copy_(tensors[f"model/{key}/{name}"])
                    if f"momentum/{key}/{name}" in tensors:
                        self.outer.sgd.state[p]["momentum_buffer"] = tensors[f"momentum/{key}/{name}"].clone()
        self.round = int(manifest["round"])
        if manifest.get("outer"):
            self.set_outer(*manifest["outer"])
        self.assignments = {c: Assignment.from_dict(a) for c, a in manifest["assignments"].items()}
        for c, (s, n) in manifest.get("features", {}).items():
            self.feature_sums[c], self.feature_counts[c] = np.asarray(s, dtype=np.float64), float(n)
