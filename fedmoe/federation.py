"""The in-process runner: the round engine with every client in this process. The Python API of fedmoe.

    from fedmoe import Config, run_federation
    result = run_federation("examples.tabular:spec", Config(grid=(3,), rounds=5))
    result.ensemble.save("runs/tabular")

Clients are enrolled in order (client i of n loads `spec.data(i, n)` unless its data is given), receive
their jobs from the engine, train with the shared `Worker`, and the engine closes each round with all
their updates: exactly what the gRPC coordinator and the Flower strategy do over their transports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmoe.assignment import PROFILES, DeviceProfile, parse_profiles
from fedmoe.clustering import cluster_stats, histogram
from fedmoe.config import Config
from fedmoe.engine import Engine
from fedmoe.ensemble import Ensemble
from fedmoe.spec import ClientData, Examples, Spec, load_spec
from fedmoe.train import Compute
from fedmoe.worker import LocalExamples, Upload, Worker


@dataclass(frozen=True, eq=False)
class LocalClient:
    """A client of the in-process runner: its own data and its device profile (a name from PROFILES,
    or a profile).
    """

    data: ClientData | Examples | tuple[torch.Tensor, torch.Tensor]
    profile: str | DeviceProfile = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.data, tuple):
            object.__setattr__(self, "data", Examples(*self.data))
        if not isinstance(self.data, ClientData | Examples):
            kind = type(self.data).__name__
            raise TypeError(f"a client's data is ClientData, Examples or (inputs, targets), got {kind}")

    @property
    def train(self) -> Examples:
        """Its training examples."""
        return self.data.train if isinstance(self.data, ClientData) else self.data

    @property
    def test(self) -> Examples | None:
        """Its held-out examples, if it has any."""
        return self.data.test if isinstance(self.data, ClientData) else None


@dataclass
class FederationResult:
    """A finished in-process federation: the engine (grid, assignments), the routed ensemble,
    metrics per round.
    """

    engine: Engine
    ensemble: Ensemble
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)


def default_clients(spec: Spec, config: Config) -> list[LocalClient]:
    """`config.clients.count` clients (one per path by default), client i holding `spec.data(i, n)`,
    profiles in turn.
    """
    if spec.data is None:
        raise ValueError(
            f"spec {spec.name!r} has no data loader: pass each client's data (LocalClient(data, profile))"
        )
    n = config.clients.count or config.n_paths
    profiles = parse_profiles(",".join(config.clients.profiles)) or ("fp32",)
    return [LocalClient(spec.data(i, n), profiles[(i // config.n_paths) % len(profiles)]) for i in range(n)]


def cluster(engine: Engine, features: Sequence[np.ndarray]) -> None:
    """Run the engine's federated k-means to convergence, every client answering from its own features."""
    while not engine.clustered:
        proposal = engine.cluster_proposal()
        stats = [cluster_stats(f, *proposal) for f in features]
        engine.cluster_update(sum(stats[1:], stats[0]))


def enrol(engine: Engine, clients: Sequence[LocalClient]) -> tuple[list[str], list[Worker]]:
    """Cluster the clients' features, assign every client its path(s) and variant in order, make its workers.

    Routing by data: a client has a worker for each cluster it holds enough examples of, training (and
    evaluating) on its examples of that cluster. Paths in turn: one worker on all of them, and the client
    reports the sum and count of its features for the router. Returns the worker ids and the workers.
    """
    batch_size = engine.config.inner.batch_size
    compute = Compute.of(engine.config.clients.device, engine.config.clients.precision)
    local = [LocalExamples(engine.spec, client.train, client.test) for client in clients]
    cluster(engine, [examples.features for examples in local])
    ids, workers = [], []
    for i, (client, examples) in enumerate(zip(clients, local)):
        client_id = f"c{i:04d}"
        profile = PROFILES[client.profile] if isinstance(client.profile, str) else client.profile
        routing = None
        if engine.kmeans is None:
            assignments = {client_id: engine.assign(client_id, profile)}
            engine.add_features(client_id, examples.features.sum(0), len(client.train))
        else:
            routing = engine.routing_state()
            assignments = engine.assign_by_data(client_id, profile, histogram(examples.features, *routing))
        for worker_id, a in assignments.items():
            path_model = engine.spec.build_path(a.path, shapes_only=a.variant.sliced)  # weights: in its jobs
            workers.append(
                examples.worker(
                    path_model, a.variant, a.seed, batch_size, a.cluster, routing, a.trains_router, compute
                )
            )
            ids.append(worker_id)
    return ids, workers


def run_federation(
    spec: Spec | str,
    config: Config | None = None,
    clients: Sequence[LocalClient] | None = None,
    on_round: Callable[[Engine, dict[str, Any], list[Upload]], None] | None = None,
    progress: str | None = None,
    engine: Engine | None = None,
) -> FederationResult:
    """Train `config.rounds` rounds with every client in this process;
    return the engine, ensemble and metrics.

    `clients` default to `default_clients`. `on_round(engine, metrics, uploads)` runs after each outer step;
    `progress` labels a progress bar (None: no bar). `engine` continues an existing engine (e.g. one whose
    grid was loaded from a shared phase) instead of a fresh one.
    """
    spec = load_spec(spec)
    config = config or Config()
    engine = engine or Engine(spec, config)
    clients = default_clients(spec, config) if clients is None else list(clients)
    ids, workers = enrol(engine, clients)
    result = FederationResult(engine, engine.ensemble())
    remaining = config.rounds - engine.round
    with tqdm(
        total=remaining * len(workers), desc=progress, disable=True if progress is None else None, leave=False
    ) as bar:
        while not engine.finished:
            uploads, updates = [], []
            for client_id, worker in zip(ids, workers):
                upload = worker.train_round(engine.job(client_id))
                uploads.append(upload)
                updates.append(engine.decode(client_id, upload))
                bar.update()
            metrics = engine.close_round(uploads, updates)
            result.rounds.append(metrics)
            bar.set_postfix(round=metrics["round"], loss=f"{metrics['loss']:.3f}")
            if on_round is not None:
                on_round(engine, metrics, uploads)
    result.clients = [
        {
            "client": client_id,
            "path": str(engine.assignments[client_id].path),
            "variant": engine.assignments[client_id].variant.name,
            "examples": int(worker.weight),
        }
        for client_id, worker in zip(ids, workers)
    ]
    return result
