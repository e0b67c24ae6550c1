"""Flower adapter: the same training as `train_federation`, run by Flower's simulation engine (Ray backend).

The only module of the project that imports flwr. `ExpertStrategy` (a `flwr.serverapp.strategy.Strategy`)
wraps the pure core: `client_assignments` gives every client a path, a part of that path's shard and a
variant (through `assign_clients`); `deliver` makes what each node receives; the `ClientApp` runs
`Worker.train_round`; `aggregate` and `OuterOptimizer.step` apply the DiLoCo outer step. Client i (the
i-th node by node id) is the i-th worker `train_federation` builds from `Federation.assignments`
(batches seeded `seed + 1000 * i`, worker seed `seed + i`, weight its number of units), so a run
through Flower and a run in-process reach the same weights.

On the wire a `QTensor` is two uint8 arrays in an ArrayRecord (`name/payload`, `name/scales`) and its
bit-width and shape in a ConfigRecord (`name/bits`, `name/shape`). A node's AdamW state, error-feedback
residuals and batch-sampler state stay in its `Context.state` between rounds (the simulation engine
keeps each node's Context and hands it to whichever Ray actor runs the node next), pickled into one bytes
value of a ConfigRecord: `ErrorFeedback` keeps its residuals private, and the state never leaves the node.
The centroid router is built from federated statistics: every client sends the sum and count of its
units' feature vectors and the server divides. The routed ensemble (top-1) is evaluated on the test split after every round.

`fedavg_baseline` runs Flower's stock FedAvg on the task's dense model, the peer baseline of
bench/communication.py. Flower never phones home nor installs anything from here: the environment
variables below are set at import.
"""

from __future__ import annotations

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.simulation import run_simulation

from fedmoe.compress.quant import QTensor
from fedmoe.data import iid
from fedmoe.ensemble import Ensemble
from fedmoe.experiment import ExperimentConfig, assign_clients, evaluate_ensemble, evaluate_model, lr_scale, make_shards, outer_optimizer
from fedmoe.federation import Assignment
from fedmoe.modular import ModularModel, Path
from fedmoe.models import ModelSpec
from fedmoe.outer import OuterOptimizer
from fedmoe.router import CentroidRouter
from fedmoe.aggregate import aggregate
from fedmoe.assignment import parse_profiles
from fedmoe.tasks import Task, load_task
from fedmoe.train import Batch, InnerConfig, train_local
from fedmoe.worker import Upload, Variant, Worker, deliver, round_masks

log = logging.getLogger("fedmoe.flower")

STATE_KEY = "fedmoe-worker"
NODE_WAIT_S = 600.0


@dataclass(frozen=True)
class FlowerConfig:
    """A federation run through Flower: task, grid, clients and their device profiles, rounds, inner and outer settings.

    The paths of the grid share the clients out in turn: path p gets `clients // n_paths` of them, one
    more for the first `clients % n_paths` paths, and its clients cycle through `profiles` and split its
    shard evenly at random (`assign_clients`). With `clients = n_paths * len(profiles)` this is exactly
    `assign_clients` for the same settings. Sub-model schemes are width schemes only: a client rebuilds its
    masks from (variant, round, seed) and shapes, never from weights it does not hold.
    """

    task: str = "digits"
    grid: tuple[int, ...] = (4,)
    clients: int = 8
    profiles: tuple[str, ...] = ("fp32", "int8", "int4-p50", "fp32-p25")
    rounds: int = 3
    inner: InnerConfig = field(default_factory=lambda: InnerConfig(steps=20))
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    partition: str = "clustered"
    clustering: str = "kmeans"
    scheme: str = "rolling"
    lr_schedule: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme == "magnitude":
            raise ValueError("magnitude masks depend on weights a pruned client never receives: use rolling, static or random")
        if not self.profiles:
            raise ValueError("name at least one device profile")
        parse_profiles(",".join(self.profiles))
        if self.clients < self.n_paths:
            raise ValueError(f"{self.clients} clients cannot train {self.n_paths} paths: give at least one client per path")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")

    @property
    def n_paths(self) -> int:
        """Number of paths, hence of shards and of experts in the ensemble."""
        return math.prod(self.grid)

    def experiment(self, profiles: tuple[str, ...] | None = None) -> ExperimentConfig:
        """The in-process experiment settings these stand for (no shared phase, centroid router)."""
        return ExperimentConfig(
            self.grid, self.rounds, 0, self.inner, self.outer_lr, self.outer_momentum, self.clustering, "centroid",
            self.lr_schedule, self.profiles if profiles is None else profiles, self.scheme, self.seed,
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerConfig:
        """Settings from a Flower run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run -c`)."""
        default = cls()
        get = run_config.get
        inner = InnerConfig(
            steps=int(get("steps", default.inner.steps)), lr=float(get("lr", default.inner.lr)),
            batch_size=int(get("batch-size", default.inner.batch_size)),
        )
        return cls(
            task=str(get("task", default.task)),
            grid=tuple(int(n) for n in str(get("grid", "x".join(map(str, default.grid)))).lower().split("x")),
            clients=int(get("clients", default.clients)),
            profiles=parse_profiles(str(get("profiles", ",".join(default.profiles)))),
            rounds=int(get("rounds", default.rounds)),
            inner=inner,
            outer_lr=float(get("outer-lr", default.outer_lr)),
            outer_momentum=float(get("outer-momentum", default.outer_momentum)),
            partition=str(get("partition", default.partition)),
            clustering=str(get("clustering", default.clustering)),
            scheme=str(get("scheme", default.scheme)),
            lr_schedule=str(get("lr-schedule", default.lr_schedule)),
            seed=int(get("seed", default.seed)),
        )


def client_assignments(model: ModularModel, paths: list[Path], shards: list[np.ndarray], config: FlowerConfig) -> list[Assignment]:
    """Every client's assignment, path by path, as `assign_clients` makes them (see `FlowerConfig`)."""
    assignments: list[Assignment] = []
    for p, (path, units) in enumerate(zip(paths, shards)):
        k = config.clients // len(paths) + (p < config.clients % len(paths))
        profiles = tuple(config.profiles[j % len(config.profiles)] for j in range(k))
        assignments += assign_clients(model, [path], [units], config.experiment(profiles))
    return assignments


@dataclass
class Federation:
    """The server's side of a run: task, grid and its shards, one assignment per client, the outer optimiser."""

    config: FlowerConfig
    task: Task
    spec: ModelSpec
    model: ModularModel
    paths: list[Path]
    shards: list[np.ndarray]
    assignments: list[Assignment]
    outer: OuterOptimizer
    schedule: Callable[[int], float] | None

    def inner(self, round: int) -> InnerConfig:
        """The inner settings of round `round` (0-based), learning rate scheduled as `train_federation` does."""
        inner = self.config.inner
        return inner if self.schedule is None else replace(inner, lr=inner.lr * self.schedule(round))

    def worker_seed(self, client: int) -> int:
        """Client `client`'s worker seed (sub-model masks)."""
        return self.config.seed + client

    def batch_seed(self, client: int) -> int:
        """Client `client`'s batch-sampler seed."""
        return self.config.seed + 1000 * client


def build_federation(config: FlowerConfig) -> Federation:
    """The grid, shards, client assignments and outer optimiser of a run; the same for the same config."""
    task = cached_task(config.task)
    spec = task.model_spec(config.grid)
    model = spec.build(config.seed)
    paths = model.paths()
    shards, _ = make_shards(task, config.partition, len(paths), config.seed, config.clustering)
    experiment = config.experiment()
    return Federation(
        config, task, spec, model, paths, shards, client_assignments(model, paths, shards, config),
        outer_optimizer(model, experiment), lr_scale(experiment),
    )


@lru_cache(maxsize=4)
def cached_task(name: str) -> Task:
    """A task by name, loaded once per process (server, or a Ray actor running many nodes)."""
    return load_task(name)


# -- wire form --------------------------------------------------------------------------------------
def encode_tensors(tensors: Mapping[str, QTensor]) -> tuple[ArrayRecord, ConfigRecord]:
    """QTensors as records: payload and scale bytes as uint8 arrays, bit-width and shape in a ConfigRecord."""
    arrays = ArrayRecord({
        f"{name}/{part}": Array(np.frombuffer(getattr(q, part), dtype=np.uint8))
        for name, q in tensors.items()
        for part in ("payload", "scales")
    })
    meta = ConfigRecord()
    for name, q in tensors.items():
        meta[f"{name}/bits"] = q.bits
        meta[f"{name}/shape"] = list(q.shape)
    return arrays, meta


def decode_tensors(arrays: ArrayRecord, meta: ConfigRecord) -> dict[str, QTensor]:
    """Inverse of `encode_tensors`."""
    names = [key[: -len("/bits")] for key in meta if key.endswith("/bits")]
    return {
        name: QTensor(
            int(meta[f"{name}/bits"]), tuple(int(d) for d in meta[f"{name}/shape"]),
            arrays[f"{name}/payload"].numpy().tobytes(), arrays[f"{name}/scales"].numpy().tobytes(),
        )
        for name in names
    }


# -- server -----------------------------------------------------------------------------------------
class ExpertStrategy(Strategy):
    """DiLoCo over a grid of experts/paths: each node gets its own path and variant, replies are aggregated per module.

    `nodes[i]` runs client i of `federation.assignments`. The global model lives in `federation.model`;
    the ArrayRecord that `Strategy.start` passes around is its state, returned after every outer step.
    """

    def __init__(self, federation: Federation, nodes: list[int]):
        if len(nodes) != len(federation.assignments):
            raise ValueError(f"{len(nodes)} nodes for {len(federation.assignments)} clients")
        self.federation = federation
        self.nodes = nodes
        self.client_of = {node: i for i, node in enumerate(nodes)}

    def summary(self) -> None:
        """Log the run's shape."""
        fed = self.federation
        variants = sorted({a.variant.name for a in fed.assignments})
        log.info("%d clients on %d paths (grid %s), variants %s", len(self.nodes), len(fed.paths), fed.config.grid, ", ".join(variants))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per client: its path as its variant holds it, and its job (path, variant, round, seeds, units)."""
        fed, round = self.federation, server_round - 1
        inner = fed.inner(round)
        messages = []
        for i, (node, a) in enumerate(zip(self.nodes, fed.assignments)):
            path_model = fed.model.compose(a.path)
            masks = round_masks(path_model, a.variant, round, fed.worker_seed(i))
            weights, shapes = encode_tensors(deliver(path_model, a.variant, masks))
            job = ConfigRecord({
                "client": i, "task": fed.config.task, "spec": json.dumps(fed.spec.to_dict()), "path": str(a.path),
                "bits": a.variant.bits, "density": a.variant.density, "scheme": a.variant.scheme, "round": round,
                "seed": fed.worker_seed(i), "batch-seed": fed.batch_seed(i), "units": [int(u) for u in a.units],
                **{f"inner-{k.replace('_', '-')}": v for k, v in asdict(inner).items()},
            })
            content = RecordDict({"weights": weights, "shapes": shapes, "job": job})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the uploads (in client order), average them per module and take the outer step."""
        fed, round = self.federation, server_round - 1
        uploads: dict[int, Upload] = {}
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, reply.metadata.src_node_id, reply.error.reason)
                continue
            i = self.client_of[reply.metadata.src_node_id]
            a = fed.assignments[i]
            tensors = decode_tensors(reply.content["upload"], reply.content["shapes"])
            loss = float(reply.content["metrics"]["loss"])
            uploads[i] = Upload(a.path, a.variant, round, fed.worker_seed(i), float(len(a.units)), tensors, loss)
        ordered = [uploads[i] for i in sorted(uploads)]
        fed.outer.step(*aggregate(fed.model, ordered))
        metrics = MetricRecord({
            "clients": len(ordered),
            "loss": float(np.mean([u.loss for u in ordered])) if ordered else float("nan"),
            "upload-bytes": sum(u.nbytes for u in ordered),
        })
        return ArrayRecord(fed.model.state_dict()), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No client-side evaluation: the routed ensemble is evaluated on the server."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see `configure_evaluate`)."""
        return None


def wait_for_nodes(grid: Grid, n: int, timeout_s: float = NODE_WAIT_S) -> list[int]:
    """The first n node ids in id order, once at least n nodes are connected."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {n} nodes connected within {timeout_s:.0f} s")
        time.sleep(0.5)
    return nodes[:n]


def federated_centroids(grid: Grid, federation: Federation, nodes: list[int]) -> np.ndarray:
    """Each path's centroid from its clients' feature sums and counts (the clients never send their data)."""
    fed = federation
    messages = [
        Message(RecordDict({"job": ConfigRecord({"task": fed.config.task, "units": [int(u) for u in a.units]})}), dst_node_id=node, message_type=MessageType.QUERY)
        for node, a in zip(nodes, fed.assignments)
    ]
    client_of = {node: i for i, node in enumerate(nodes)}
    path_index = {path: k for k, path in enumerate(fed.paths)}
    sums = np.zeros((len(fed.paths), fed.task.features.shape[1]))
    counts = np.zeros(len(fed.paths))
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to send its feature statistics: {reply.error.reason}")
        k = path_index[fed.assignments[client_of[reply.metadata.src_node_id]].path]
        sums[k] += reply.content["stats"]["sum"].numpy()
        counts[k] += float(reply.content["count"]["count"])
    if (counts == 0).any():
        raise RuntimeError(f"no feature statistics for paths {np.flatnonzero(counts == 0).tolist()}")
    return (sums / counts[:, None]).astype(np.float32)


def run_server(grid: Grid, config: FlowerConfig, out: FsPath | None = None) -> dict[str, Any]:
    """The ServerApp's work: route by federated centroids, train `config.rounds` rounds, evaluate after each.

    Returns the config, the clients and per-round metrics (mean inner loss, upload bytes, ensemble top-1);
    saves the ensemble checkpoint and results.json to `out` when given.
    """
    started = time.perf_counter()
    fed = build_federation(config)
    nodes = wait_for_nodes(grid, config.clients)
    centroids = federated_centroids(grid, fed, nodes)
    ensemble = Ensemble(fed.spec, fed.model, fed.paths, CentroidRouter(centroids))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        top1 = evaluate_ensemble(ensemble, fed.task, 1)
        log.info("round %d/%d: routed ensemble top-1 %s %.4f", server_round, config.rounds, fed.task.metric, top1)
        return MetricRecord({"top1": top1})

    strategy = ExpertStrategy(fed, nodes)
    result = strategy.start(grid, ArrayRecord(fed.model.state_dict()), num_rounds=config.rounds, evaluate_fn=evaluate)
    rounds = [
        {"round": r, "top1": float(result.evaluate_metrics_serverapp[r]["top1"]), **{k.replace("-", "_"): m[k] for k in m}}
        for r, m in sorted(result.train_metrics_clientapp.items())
    ]
    results = {
        "config": asdict(config),
        "metric": fed.task.metric,
        "initial_top1": float(result.evaluate_metrics_serverapp[0]["top1"]),
        "rounds": rounds,
        "clients": [{"client": i, "path": str(a.path), "variant": a.variant.name, "units": len(a.units)} for i, a in enumerate(fed.assignments)],
        "centroids": centroids.tolist(),
        "seconds": time.perf_counter() - started,
    }
    if out is not None:
        ensemble.save(out, extra={"task": config.task, "flower": asdict(config)})
        (FsPath(out) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def make_server_app(config: FlowerConfig | None = None, out: FsPath | None = None, report: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """A ServerApp running `run_server`; settings from `config`, else from the run config (`flwr run`).

    `out` (else the run config's "out", when not empty) receives the checkpoint; `report` receives the results.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = config or FlowerConfig.from_run_config(context.run_config)
        directory = out or (FsPath(str(context.run_config["out"])) if context.run_config.get("out") else None)
        results = run_server(grid, settings, directory)
        if report is not None:
            report(results)

    return app


# -- client -----------------------------------------------------------------------------------------
class _Batches:
    """The stream `Task.batches` yields (same generator, same draws), whose generator state can be kept between rounds."""

    def __init__(self, task: Task, units: np.ndarray, batch_size: int, seed: int):
        self.task, self.units, self.batch_size = task, np.asarray(units), batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Batch:
        return self.task.sample(self.units, self.batch_size, self.generator)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's path for one round and reply with its outer gradient in wire form."""
    job = msg.content["job"]
    task = cached_task(str(job["task"]))
    path = Path.parse(str(job["path"]))
    variant = Variant(int(job["bits"]), float(job["density"]), str(job["scheme"]))
    inner = InnerConfig(**{k: job[f"inner-{k.replace('_', '-')}"] for k in InnerConfig.__dataclass_fields__})
    units = np.asarray(job["units"], dtype=np.int64)
    round, seed = int(job["round"]), int(job["seed"])
    batches = _Batches(task, units, inner.batch_size, int(job["batch-seed"]))
    worker = Worker(path, batches, float(len(units)), variant, seed)
    if STATE_KEY in context.state:  # this node's own state from its previous rounds, pickled by this function below
        state = pickle.loads(context.state[STATE_KEY]["state"])
        worker.optimizer_state, worker.feedback = state["optimizer"], state["feedback"]
        batches.generator.set_state(state["generator"])
    path_model = ModelSpec.from_dict(json.loads(str(job["spec"]))).build().compose(path)
    masks = round_masks(path_model, variant, round, seed)
    upload = worker.train_round(path_model, decode_tensors(msg.content["weights"], msg.content["shapes"]), masks, inner, round)
    state = {"optimizer": worker.optimizer_state, "feedback": worker.feedback, "generator": batches.generator.get_state()}
    context.state[STATE_KEY] = ConfigRecord({"state": pickle.dumps(state)})
    arrays, shapes = encode_tensors(upload.tensors)
    metrics = MetricRecord({"loss": upload.loss, "weight": upload.weight, "upload-bytes": upload.nbytes})
    return Message(RecordDict({"upload": arrays, "shapes": shapes, "metrics": metrics}), reply_to=msg)


@client_app.query()
def feature_stats(msg: Message, context: Context) -> Message:
    """Reply with the sum and the count of this node's units' feature vectors."""
    job = msg.content["job"]
    features = cached_task(str(job["task"])).features[np.asarray(job["units"], dtype=np.int64)].astype(np.float64)
    content = RecordDict({"stats": ArrayRecord({"sum": Array(features.sum(0))}), "count": MetricRecord({"count": len(features)})})
    return Message(content, reply_to=msg)


server_app = make_server_app()


# -- running a simulation ---------------------------------------------------------------------------
def backend_config(cpus_per_client: float = 1, gpus_per_client: float = 0, ray_address: str | None = None) -> dict[str, Any]:
    """Ray backend settings: resources per virtual client and, for an existing cluster, its address."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}}
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        config["init_args"] = {"address": address}
    return config


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's advice to call `flwr run` instead of `run_simulation`: fedmoe makes that call, and offers `flwr run` too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _run(server: ServerApp, client: ClientApp, nodes: int, cpus_per_client: float, gpus_per_client: float, ray_address: str | None, verbose: bool) -> None:
    notice, flower_log = _RunSimulationNotice(), logging.getLogger("flwr")
    flower_log.addFilter(notice)
    try:
        run_simulation(server, client, nodes, backend_config=backend_config(cpus_per_client, gpus_per_client, ray_address), verbose_logging=verbose)
    finally:
        flower_log.removeFilter(notice)


def simulate_federation(
    config: FlowerConfig,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    out: FsPath | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `config` with `config.clients` virtual nodes on Ray (local, or the cluster at `ray_address`/RAY_ADDRESS).

    Returns what `run_server` returns; raises what the ServerApp raised.
    """
    results: list[dict[str, Any]] = []
    _run(make_server_app(config, out, results.append), client_app, config.clients, cpus_per_client, gpus_per_client, ray_address, verbose)
    if not results:
        raise RuntimeError("the simulation ended without results")
    return results[0]


def simulate(
    clients: int,
    profiles: tuple[str, ...],
    rounds: int,
    grid: tuple[int, ...] = (4,),
    steps: int = 20,
    task: str = "digits",
    lr: float = 3e-3,
    batch_size: int = 32,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    partition: str = "clustered",
    clustering: str = "kmeans",
    scheme: str = "rolling",
    lr_schedule: str = "constant",
    seed: int = 0,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    out: FsPath | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train experts/paths with `clients` virtual Flower clients of the given device profiles; per-round metrics.

    See `FlowerConfig` for how clients are assigned and `simulate_federation` for the rest.
    """
    config = FlowerConfig(
        task, tuple(grid), clients, tuple(profiles), rounds, InnerConfig(steps, lr, batch_size=batch_size), outer_lr, outer_momentum,
        partition, clustering, scheme, lr_schedule, seed,
    )
    return simulate_federation(config, cpus_per_client, gpus_per_client, ray_address, out, verbose)


# -- the peer baseline: Flower's stock FedAvg on the dense model ------------------------------------
fedavg_client_app = ClientApp()


@lru_cache(maxsize=4)
def fedmoe_client_units(task: str, paths: int, clients: int, seed: int) -> tuple[np.ndarray, ...]:
    """The units each client holds in the fedmoe federation of `clients` clients on `paths` clustered shards."""
    return tuple(a.units for a in build_federation(FlowerConfig(task, (paths,), clients, seed=seed)).assignments)


@fedavg_client_app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Train the dense model for the configured local epochs on this node's part of the data; reply with its weights.

    The part is an iid one (`paths` 0), or what the fedmoe client with the same id holds when its federation
    has `paths` clustered shards: the same clients with the same data.
    """
    config = msg.content["config"]
    task = cached_task(str(config["task"]))
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    seed, batch_size, paths = int(config["seed"]), int(config["batch-size"]), int(config["paths"])
    units = fedmoe_client_units(task.name, paths, partitions, seed)[partition] if paths else iid(task.n_units, partitions, seed=seed)[partition]
    model = ModelSpec.from_dict(json.loads(str(config["spec"]))).build()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    steps = int(config["epochs"]) * math.ceil(len(units) / batch_size)
    inner = InnerConfig(steps, float(config["lr"]), batch_size=batch_size)
    batches = task.batches(units, batch_size, seed + 1000 * partition + int(config["server-round"]))
    loss, _ = train_local(model.compose(Path((0,))), batches, inner)
    state = model.state_dict()
    metrics = MetricRecord({"num-examples": len(units), "loss": loss, "local-steps": steps,
                            "upload-bytes": sum(t.numel() * t.element_size() for t in state.values())})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def fedavg_baseline(
    clients: int,
    rounds: int,
    task: str = "digits",
    epochs: int = 1,
    lr: float = 3e-3,
    batch_size: int = 32,
    paths: int = 0,
    seed: int = 0,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Flower's FedAvg on the task's dense model (one module), each client `epochs` local AdamW epochs per round.

    Clients hold iid parts of the data (`paths` 0), or the data of the fedmoe clients in a federation of
    `paths` clustered shards (`fedmoe_client_units`). Returns per-round test metric (server side), bytes
    each client uploaded (its fp32 weights) and its local steps.
    """
    results: list[dict[str, Any]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        data = cached_task(task)
        spec = data.model_spec((1,))
        model = spec.build(seed)
        dense = model.compose(Path((0,)))

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord({data.metric: evaluate_model(dense, data)})

        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        train_config = ConfigRecord({"task": task, "spec": json.dumps(spec.to_dict()), "epochs": epochs, "lr": lr, "batch-size": batch_size, "paths": paths, "seed": seed})
        result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=rounds, train_config=train_config, evaluate_fn=evaluate)
        results.append({
            "metric": data.metric,
            "rounds": [
                {"round": r, data.metric: float(result.evaluate_metrics_serverapp[r][data.metric]),
                 "loss": float(m["loss"]), "upload_bytes_per_client": int(round(float(m["upload-bytes"]))),
                 "local_steps": float(m["local-steps"])}
                for r, m in sorted(result.train_metrics_clientapp.items())
            ],
        })

    _run(server, fedavg_client_app, clients, cpus_per_client, gpus_per_client, ray_address, verbose)
    if not results:
        raise RuntimeError("the simulation ended without results")
    return results[0]

