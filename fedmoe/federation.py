"""The in-process runner: the round engine with every client in this process. The Python API of fedmoe.

    from fedmoe import Config, run_federation
    result = run_federation("examples.tabular:spec", Config(grid=(3,), rounds=5))
    result.ensemble.save("runs/tabular")

Clients are enrolled in order (client i of n loads `spec.data(i, n)` unless its data is given), receive
their jobs from the engine, train with the shared `Worker`, and the engine closes each round with all
their updates: exactly what the gRPC coordinator and the Flower strategy do over their transports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from fedmoe.assignment import PROFILES, DeviceProfile, parse_profiles
from fedmoe.config import Config
from fedmoe.engine import Engine
from fedmoe.ensemble import Ensemble
from fedmoe.spec import ClientData, Examples, Spec, load_spec
from fedmoe.worker import Upload, Worker


@dataclass(frozen=True, eq=False)
class LocalClient:
    """A client of the in-process runner: its own data and its device profile (a name from PROFILES,
    or a profile).
    """

    data: ClientData | Examples
    profile: str | DeviceProfile = "fp32"

    @property
    def train(self) -> Examples:
        """Its training examples."""
        return self.data.train if isinstance(self.data, ClientData) else self.data


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


def enrol(engine: Engine, clients: Sequence[LocalClient]) -> tuple[list[str], list[Worker]]:
    """Assign every client a path and variant in order, record its routing statistics, and make its worker."""
    ids, workers = [], []
    for i, client in enumerate(clients):
        client_id = f"c{i:04d}"
        profile = PROFILES[client.profile] if isinstance(client.profile, str) else client.profile
        a = engine.assign(client_id, profile)
        train = client.train
        engine.add_features(client_id, *engine.spec.feature_statistics(train))
        path_model = copy.deepcopy(engine.model.compose(a.path))
        workers.append(
            Worker(
                engine.spec,
                path_model,
                train.batches(engine.config.inner.batch_size, a.seed),
                len(train),
                a.variant,
            )
        )
        ids.append(client_id)
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
            "examples": len(client.train),
        }
        for client_id, client in zip(ids, clients)
    ]
    return result
