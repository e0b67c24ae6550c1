"""The round engine: one implementation of a federation's rounds, driven by every runner.

`Engine` owns the grid and the round counter. It assigns each client a path (load balance over the
paths, in enrolment order) and a variant (the densest its device profile fits), makes what a client
receives each round (`job`), decodes and checks what it sends back (`decode`), aggregates a round's
updates with the configured rule, all at once or as they arrive (`aggregation`), takes the DiLoCo outer
step (`close_round`, `close_aggregated`), and builds the routed ensemble from federated feature statistics
(each client's sum and count of routing features, never its data). The in-process runner
(`fedmoe.federation`), the gRPC coordinator (`fedmoe.server`) and the Flower strategy
(`fedmoe.strategies.flower`) are thin drivers around it: they differ in transport, membership and
persistence, not in the algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedmoe.aggregate import Aggregation
from fedmoe.assignment import DeviceProfile, assign_variant
from fedmoe.clustering import ClusterStats, FederatedKMeans, check_histogram
from fedmoe.compress.quant import QTensor, dequantize, quantize
from fedmoe.config import Config, InnerConfig, resolve_outer
from fedmoe.ensemble import Ensemble
from fedmoe.modular import ModularModel, Path
from fedmoe.outer import OuterOptimizer, Update
from fedmoe.router import CentroidRouter, LearnedRouter
from fedmoe.spec import Examples, Spec
from fedmoe.worker import ROUTER, Job, Layout, Upload, Variant, decode, make_job

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
    # the cluster whose examples it trains on (routing by data), else None: all of them
    cluster: int | None = None
    examples: int = 0  # how many examples it reported for that cluster (0: not reported)
    trains_router: bool = False  # its client's worker that also trains the learned router (one per client)

    @property
    def mask_seed(self) -> int | None:
        """The seed its sub-model's masks depend on; None for a dense variant, whose masks are none."""
        return self.seed if self.variant.density < 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for state files and messages."""
        v = self.variant
        return {
            "path": str(self.path),
            "bits": v.bits,
            "density": v.density,
            "scheme": v.scheme,
            "seed": self.seed,
            "cluster": self.cluster,
            "examples": self.examples,
            "trains_router": self.trains_router,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assignment:
        """Inverse of `to_dict`."""
        variant = Variant(int(d["bits"]), float(d["density"]), str(d["scheme"]))
        cluster = d.get("cluster")
        return cls(
            Path.parse(d["path"]),
            variant,
            int(d["seed"]),
            None if cluster is None else int(cluster),
            int(d.get("examples", 0)),
            bool(d.get("trains_router", False)),
        )


@dataclass(frozen=True)
class Received:
    """What closing a round needs of an upload besides its outer gradient (aggregated as it arrives): its
    weight, inner loss, evaluation and bytes, and the learned router's tensors when it trains the router
    (small: features x paths)."""

    weight: float
    loss: float
    evaluation: dict[str, float]
    nbytes: int
    router: dict[str, QTensor]

    @classmethod
    def of(cls, upload: Upload) -> Received:
        """What `upload` leaves once its outer gradient is aggregated (the router's tensors copied: a received
        upload's are views of the whole upload's bytes)."""
        router = {
            n[len(ROUTER) :]: QTensor(q.bits, q.shape, bytes(q.payload), bytes(q.scales))
            for n, q in upload.tensors.items()
            if n.startswith(ROUTER)
        }
        return cls(upload.weight, upload.loss, dict(upload.evaluation), upload.nbytes, router)


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
        self.deliveries: dict[tuple, Job] = {}  # this round's jobs by what they deliver (see `delivery`)
        self.layouts: dict[tuple, Layout] = {}  # this round's upload layouts (see `layout`)
        routing = config.routing
        self.kmeans = self.new_kmeans() if routing.assign == "data" else None
        self.router_model: LearnedRouter | None = (
            None  # the federated learned router, once clustering converged
        )
        self._eval: Examples | None = None

    def new_kmeans(self) -> FederatedKMeans:
        """Federated k-means from its first pass, as `config.routing` sets it (routing by data); a clustering
        whose members all went silent starts again from here."""
        routing = self.config.routing
        return FederatedKMeans(
            self.config.n_paths,
            routing.tol,
            routing.max_iter,
            routing.balanced,
            second_moments=self.spec.cluster_router is not None,
        )

    @property
    def finished(self) -> bool:
        """All rounds are done."""
        return self.round >= self.config.rounds

    # -- clustering -------------------------------------------------------------------------
    @property
    def clustered(self) -> bool:
        """Whether paths can be assigned: federated k-means has converged (always, with paths in turn)."""
        return self.kmeans is None or self.kmeans.done

    def cluster_proposal(self) -> tuple[np.ndarray | None, np.ndarray | None, float, bool]:
        """What every client computes its `cluster_stats` against now (see `FederatedKMeans.proposal`)."""
        if self.kmeans is None or self.kmeans.done:
            raise RuntimeError("no clustering is under way")
        return self.kmeans.proposal()

    def cluster_update(self, total: ClusterStats) -> bool:
        """Fold in the sum of all clients' statistics for the current proposal; return if it converged."""
        done = self.kmeans.update(total)
        if done and self.config.routing.router == "learned":
            self.router_model = new_router(self.kmeans.centroids.shape[1], self.config)
        if done:
            sizes = self.kmeans.last.counts.astype(int).tolist()
            log.info(
                "federated k-means converged after %d client passes: %d clusters of %s examples, "
                "router temperature %.4g",
                self.kmeans.iterations,
                self.config.n_paths,
                sizes,
                self.kmeans.temperature,
            )
        return done

    def routing_state(self) -> tuple[np.ndarray, np.ndarray]:
        """The converged centroids and prices clients compute their histograms and training examples with."""
        if self.kmeans is None or not self.kmeans.done:
            raise RuntimeError("federated k-means has not converged")
        return self.kmeans.centroids, self.kmeans.prices

    # -- clients ----------------------------------------------------------------------------
    def assign(self, client_id: str, profile: DeviceProfile) -> Assignment:
        """Paths in turn: give a new client the least-loaded path (lowest index on ties) and the densest
        variant its profile fits. Raises ValueError when the profile cannot hold a path at any density."""
        if self.kmeans is not None:
            raise ValueError("paths follow the clients' data (routing.assign = 'data'): use assign_by_data")
        load = {path: 0 for path in self.paths}
        for a in self.assignments.values():
            load[a.path] += 1
        path = min(self.paths, key=lambda p: (load[p], p))
        return self._register(client_id, path, profile, None, 0)

    def assign_by_data(
        self, client_id: str, profile: DeviceProfile, histogram: object
    ) -> dict[str, Assignment]:
        """Routing by data: a worker of the client for every cluster holding at least `routing.min_share` of
        its examples (always its largest), each training that cluster's path on its examples of the cluster.

        `histogram` is its count of examples per cluster (see `fedmoe.clustering.histogram`). Returns
        {worker id ("<client id>.<cluster>"): assignment}; a worker id is what jobs and uploads are keyed by.
        Raises ValueError before clustering has converged, for a bad histogram, or when the profile cannot
        hold a path at any density it accepts.
        """
        if self.kmeans is None or not self.kmeans.done:
            raise ValueError("clients get paths by their data once federated k-means has converged")
        counts = check_histogram(histogram, self.config.n_paths)
        chosen = {int(counts.argmax())} | {
            int(k) for k in np.flatnonzero(counts >= self.config.routing.min_share * counts.sum())
        }
        majority = int(
            counts.argmax()
        )  # its worker also trains the learned router on all the client's examples
        return {
            f"{client_id}.{k}": self._register(
                f"{client_id}.{k}", self.paths[k], profile, k, int(counts[k]), k == majority
            )
            for k in sorted(chosen)
        }

    def _register(
        self,
        worker_id: str,
        path: Path,
        profile: DeviceProfile,
        cluster: int | None,
        examples: int,
        trains_router: bool = False,
    ) -> Assignment:
        variant = assign_variant(profile, self.model.compose(path), self.config.compression.scheme)
        seed = self.config.seed + len(self.assignments)
        learned = self.config.routing.router == "learned"
        assignment = Assignment(path, variant, seed, cluster, examples, trains_router and learned)
        self.assignments[worker_id] = assignment
        return assignment

    def inner(self, round: int) -> InnerConfig:
        """The inner settings of round `round`, its learning rate scheduled over the run."""
        inner = self.config.inner
        return inner.model_copy(update={"lr": inner.lr_at(round, self.config.rounds)})

    def delivery(self, client_id: str) -> tuple:
        """What `client_id`'s job delivers this round, as a key: workers with the same key receive the same
        tensors (the round, the path, the variant, the seed when a sub-model's masks depend on it, and
        whether the router travels with it)."""
        a = self.assignments[client_id]
        router = a.trains_router and self.router_model is not None
        return self.round, a.path, a.variant, a.mask_seed, router

    def job(self, client_id: str) -> Job:
        """What `client_id` receives for the open round:
        its path's weights as its variant holds them, and how to train.

        A delivery is made once per round and key (see `delivery`): every worker that receives the same
        tensors shares them (the same dict: read them, do not change them).
        """
        a, key = self.assignments[client_id], self.delivery(client_id)
        job = self.deliveries.get(key)
        if job is None:
            self.deliveries = {k: j for k, j in self.deliveries.items() if k[0] == self.round}
            job = make_job(self.model, a.path, a.variant, self.round, a.seed, self.inner(self.round))
            if key[-1]:
                job.tensors.update(
                    {ROUTER + n: quantize(t.detach(), 32) for n, t in self.router_model.tensors().items()}
                )
            self.deliveries[key] = job
        return replace(job, seed=a.seed)

    def check(self, client_id: str, upload: Upload) -> None:
        """Raise ValueError unless `upload` is for this client's path, variant and seed."""
        a = self.assignments[client_id]
        if (upload.path, upload.variant, upload.seed) != (a.path, a.variant, a.seed):
            raise ValueError(
                f"update is for path {upload.path} {upload.variant}, the assignment is {a.path} {a.variant}"
            )

    def expected_upload(self, client_id: str, round: int) -> dict[str, tuple[int, tuple[int, ...]]]:
        """The tensors an upload of `client_id`'s worker for `round` carries: {name: (bits, shape)}, its
        path's held coordinates at its variant's bit-width (and the router's at 32 bits when it trains it)."""
        a = self.assignments[client_id]
        bits = a.variant.bits
        expected = {name: (bits, held) for name, held in self.layout(client_id, round).held.items()}
        if a.trains_router and self.router_model is not None:
            expected.update(
                {ROUTER + n: (32, tuple(t.shape)) for n, t in self.router_model.tensors().items()}
            )
        return expected

    def decode(self, client_id: str, upload: Upload) -> Update:
        """Check an upload against the client's assignment and the grid,
        and turn it into per-module outer gradients.
        """
        self.check(client_id, upload)
        path_part = {n: q for n, q in upload.tensors.items() if not n.startswith(ROUTER)}
        router_part = {n[len(ROUTER) :]: q for n, q in upload.tensors.items() if n.startswith(ROUTER)}
        if self.assignments[client_id].trains_router and self.router_model is not None:
            expected = {n: tuple(t.shape) for n, t in self.router_model.tensors().items()}
            got = {n: tuple(q.shape) for n, q in router_part.items()}
            if got != expected or any(q.bits != 32 for q in router_part.values()):
                raise ValueError(f"router tensors {got}, expected 32-bit {expected}")
        elif router_part:
            raise ValueError(f"this worker does not train the router, yet sent {sorted(router_part)}")
        layout = self.layout(client_id, upload.round)
        return decode(self.model, replace(upload, tensors=path_part), layout)

    def layout(self, client_id: str, round: int) -> Layout:
        """The layout of `client_id`'s uploads trained in `round`, made once per open round (the masks of a
        sub-model depend on its round and seed, a magnitude mask on the weights the open round started
        from)."""
        a = self.assignments[client_id]
        key = (self.round, a.path, a.variant, round, a.mask_seed)
        layout = self.layouts.get(key)
        if layout is None:
            self.layouts = {k: v for k, v in self.layouts.items() if k[0] == self.round}
            layout = self.layouts[key] = Layout.of(self.model.compose(a.path), a.variant, round, a.seed)
        return layout

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

    def aggregation(self) -> Aggregation:
        """An empty aggregation by the configured rule, for the open round's updates as they arrive."""
        agg = self.config.aggregation
        return Aggregation(agg.rule, agg.trim, agg.clip_norm)

    def close_round(self, uploads: Sequence[Upload], updates: Sequence[Update]) -> dict[str, Any]:
        """Aggregate the round's updates (decoded from `uploads`, in this order) with the configured rule,
        take the outer step, open the next round; the round's metrics (see `close_aggregated`)."""
        aggregation = self.aggregation()
        for update in updates:
            aggregation.add(update)
        return self.close_aggregated(aggregation, [Received.of(upload) for upload in uploads])

    def close_aggregated(self, aggregation: Aggregation, received: Sequence[Received]) -> dict[str, Any]:
        """Take the outer step with the round's aggregated updates (what `received` describes, in enrolment
        order), average the learned router, open the next round.

        The first call fixes the outer step's lr and momentum by `resolve_outer`. Returns the round's metrics:
        updates, mean inner loss, upload bytes, and the ensemble's metrics on the spec's eval set when it has
        one.
        """
        if not received or not aggregation.counts:
            raise ValueError("a round closes with at least one update")
        if self.outer_choice is None:
            self.set_outer(*resolve_outer(self.config.outer, max(aggregation.counts.values())))
        self.outer.step(*aggregation.result())
        self.average_router(received)
        metrics: dict[str, Any] = {
            "round": self.round + 1,
            "updates": len(received),
            "loss": float(np.mean([r.loss for r in received])),
            "upload_bytes": sum(r.nbytes for r in received),
        }
        metrics.update(client_evaluation(received))
        self.round += 1
        if self.spec.eval_data is not None and self.has_router:
            metrics.update(self.evaluate())
        return metrics

    def average_router(self, received: Sequence[Received]) -> None:
        """FedAvg of the learned router: subtract the mean of the router changes, weighted by examples."""
        sent = [(r.weight, r.router) for r in received if r.router]
        if self.router_model is None or not sent:
            return
        total = sum(w for w, _ in sent)
        with torch.no_grad():
            for name, p in self.router_model.named_parameters():
                p -= sum(w * dequantize(t[name]) for w, t in sent) / total

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

    @property
    def has_router(self) -> bool:
        """Whether the ensemble can be built: some client has a path (and, in turn, reported its features)."""
        return bool(self.assignments) if self.kmeans is not None else bool(self.feature_sums)

    def ensemble(self) -> Ensemble:
        """The trained paths with their router (paths nobody trained are left out of a centroid router).

        Routing by data: the federated learned router over every path, or the spec's `cluster_router` of
        the federated clusters' statistics, or the federated k-means centroids, prices and temperature. Paths
        in turn: each path's clients' mean features, at temperature 0.1.
        """
        if self.router_model is not None:
            return Ensemble(self.spec, self.model, self.paths, self.router_model, self.config.grid)
        if self.kmeans is None:
            paths, centroids = self.centroids()
            return Ensemble(self.spec, self.model, paths, CentroidRouter(centroids), self.config.grid)
        trained = sorted({a.cluster for a in self.assignments.values()})
        if not trained:
            raise ValueError("no client has a path yet")
        if self.spec.cluster_router is not None:
            counts, means, covariances = self.kmeans.last.moments()
            router = self.spec.cluster_router(counts[trained], means[trained], covariances[trained])
        else:
            centroids, prices = self.routing_state()
            router = CentroidRouter(centroids[trained], self.kmeans.temperature, prices[trained])
        return Ensemble(self.spec, self.model, [self.paths[k] for k in trained], router, self.config.grid)

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
        if self.router_model is not None:
            tensors |= {ROUTER + n: t for n, t in self.router_model.tensors().items()}
        return tensors

    def state_manifest(self) -> dict[str, Any]:
        """The round, the outer step's choice, assignments and routing statistics, as JSON."""
        return {
            "round": self.round,
            "outer": self.outer_choice,
            "clustering": self.kmeans.state() if self.kmeans is not None and self.kmeans.done else None,
            "assignments": {c: a.to_dict() for c, a in self.assignments.items()},
            "features": {
                c: [self.feature_sums[c].tolist(), self.feature_counts[c]] for c in self.feature_sums
            },
        }

    def load_state(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Restore what `state_tensors` and `state_manifest` saved."""
        self.deliveries = {}
        with torch.no_grad():
            for key in self.model.module_keys():
                for name, p in self.model.module(key).named_parameters():
                    p.copy_(tensors[f"model/{key}/{name}"])
                    if f"momentum/{key}/{name}" in tensors:
                        self.outer.sgd.state[p]["momentum_buffer"] = tensors[f"momentum/{key}/{name}"].clone()
        self.round = int(manifest["round"])
        if manifest.get("outer"):
            self.set_outer(*manifest["outer"])
        if manifest.get("clustering") and self.kmeans is not None:
            self.kmeans.restore(manifest["clustering"])
            if self.config.routing.router == "learned":
                self.router_model = new_router(self.kmeans.centroids.shape[1], self.config)
                self.router_model.load_state_dict(
                    {n[len(ROUTER) :]: t for n, t in tensors.items() if n.startswith(ROUTER)}
                )
        self.assignments = {c: Assignment.from_dict(a) for c, a in manifest["assignments"].items()}
        for c, (s, n) in manifest.get("features", {}).items():
            self.feature_sums[c], self.feature_counts[c] = np.asarray(s, dtype=np.float64), float(n)


def client_evaluation(received: Sequence[Received]) -> dict[str, float]:
    """The clients' own evaluations of their paths on their held-out examples: per metric, the mean weighted
    by their numbers of examples ("client_<metric>") and the spread ("client_<metric>_min", "_max")."""
    reports = [r.evaluation for r in received if r.evaluation.get("examples", 0) > 0]
    if not reports:
        return {}
    counts = np.array([r["examples"] for r in reports], dtype=np.float64)
    out = {"client_examples": float(counts.sum()), "client_reports": float(len(reports))}
    for name in sorted(set.intersection(*(set(r) for r in reports)) - {"examples"}):
        values = np.array([r[name] for r in reports], dtype=np.float64)
        out[f"client_{name}"] = float((values * counts).sum() / counts.sum())
        out[f"client_{name}_min"], out[f"client_{name}_max"] = float(values.min()), float(values.max())
    return out


def new_router(width: int, config: Config) -> LearnedRouter:
    """The learned router's initial weights: the same for the same seed, width and number of paths."""
    torch.manual_seed(config.seed)
    return LearnedRouter(width, config.n_paths)
