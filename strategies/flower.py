"""The Flower runner: the round engine (`fedmoe.engine.Engine`) driven over Flower's Message API.

The only module of fedmoe that imports flwr. The ServerApp holds the engine and never any data: it waits
for its nodes, asks each for the routing statistics of its own data (a QUERY; the node answers
`spec.feature_statistics` of its training examples, a sum and a count), enrols them in the order of the
partitions they hold (node with partition i is client f"c{i:04d}", its device profile chosen as
`fedmoe.federation.default_clients` chooses it), and then `EngineStrategy` sends each client its
`engine.job` every round and closes the round with `engine.close_round` (the configured aggregation rule
and the DiLoCo outer step). The ClientApp loads the spec by its import string and its own data with
`spec.data(partition-id, num-partitions)` of its node config, and trains with the shared `Worker`. The
same spec and `Config` reach the same weights as `fedmoe.run_federation`.

On the wire a `QTensor` is two uint8 arrays in an ArrayRecord (`name/payload`, `name/scales`) and its
bit-width and shape in a ConfigRecord (`name/bits`, `name/shape`). A node's optimiser state, error-feedback
residuals and batch-sampler state stay in its `Context.state` between rounds, pickled into one bytes value
(the simulation engine keeps each node's Context and hands it to whichever Ray actor runs the node next).

Settings come as a `Config` (`simulate_federation`, `fedmoe simulate`) or from the Flower run config
(`flwr run .`, `[tool.flwr.app.config]`; see `config_from_run_config`). Flower never phones home nor
installs anything from here: the environment variables below are set at import.
"""

from __future__ import annotations

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path as FsPath  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch import nn  # noqa: E402

from fedmoe.assignment import PROFILES, parse_profiles  # noqa: E402
from fedmoe.compress.quant import QTensor  # noqa: E402
from fedmoe.config import Config, InnerConfig  # noqa: E402
from fedmoe.engine import NETWORK_SCHEMES, Engine  # noqa: E402
from fedmoe.modular import ModularModel, Path  # noqa: E402
from fedmoe.outer import Update  # noqa: E402
from fedmoe.spec import Spec, load_spec  # noqa: E402
from fedmoe.worker import Job, Upload, Variant, Worker, round_masks  # noqa: E402

log = logging.getLogger("fedmoe.flower")

STATE_KEY = "fedmoe-worker"
NODE_WAIT_S = 600.0


# -- settings ---------------------------------------------------------------------------------------
def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The `Config` of a Flower run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run -c`).

    "spec" is the spec's import string and "config" an optional fedmoe TOML file; every other key is a
    dotted Config key overriding the file's (Flower flattens nested tables, so `[tool.flwr.app.config.inner]
    steps = 20` arrives as "inner.steps"). Shortcuts: "grid" as "2x2", "clients" for clients.count,
    "profiles" (a mix or profile names joined by commas) for clients.profiles. An empty string leaves a key
    unset (the file's value, else the default: e.g. outer.lr "" is chosen by `resolve_outer`). "out" (the
    checkpoint directory) is the ServerApp's, not the Config's.
    """
    values = dict(run_config)
    values.pop("out", None)
    config_file = str(values.pop("config", "") or "") or None
    overrides: dict[str, Any] = {}
    for key, value in values.items():
        if value == "":
            continue
        if key == "clients":
            key = "clients.count"
        if key in ("profiles", "clients.profiles"):
            key, value = "clients.profiles", parse_profiles(str(value))
        overrides[key] = value
    return Config.load(config_file, overrides)


def load_checked(config: Config) -> Spec:
    """The spec of `config`, after refusing what a Flower federation cannot run."""
    if config.compression.scheme not in NETWORK_SCHEMES:
        raise ValueError(
            f"compression.scheme {config.compression.scheme!r}: its masks depend on weights a "
            f"pruned client never receives; use one of {', '.join(NETWORK_SCHEMES)}"
        )
    spec = load_spec(config.spec)
    if spec.data is None:
        raise ValueError(
            f"spec {spec.ref or spec.name!r} has no data loader: Flower's clients load their "
            "data with spec.data"
        )
    return spec


def client_profile(config: Config, index: int) -> str:
    """The device profile of the `index`-th client enrolled, as `fedmoe.federation.default_clients` gives."""
    profiles = parse_profiles(",".join(config.clients.profiles)) or ("fp32",)
    return profiles[(index // config.n_paths) % len(profiles)]


# -- wire form --------------------------------------------------------------------------------------
def encode_tensors(tensors: Mapping[str, QTensor]) -> tuple[ArrayRecord, ConfigRecord]:
    """QTensors as records: payload and scale bytes as uint8 arrays, bit-width and shape in a ConfigRecord."""
    arrays = ArrayRecord(
        {
            f"{name}/{part}": Array(np.frombuffer(getattr(q, part), dtype=np.uint8))
            for name, q in tensors.items()
            for part in ("payload", "scales")
        }
    )
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
            int(meta[f"{name}/bits"]),
            tuple(int(d) for d in meta[f"{name}/shape"]),
            arrays[f"{name}/payload"].numpy().tobytes(),
            arrays[f"{name}/scales"].numpy().tobytes(),
        )
        for name in names
    }


def _header(path: Path, variant: Variant, round: int, seed: int) -> dict[str, Any]:
    return {
        "path": str(path),
        "bits": variant.bits,
        "density": variant.density,
        "scheme": variant.scheme,
        "round": round,
        "seed": seed,
    }


def _variant(header: ConfigRecord) -> Variant:
    return Variant(int(header["bits"]), float(header["density"]), str(header["scheme"]))


def encode_job(job: Job, config: Config) -> RecordDict:
    """A job as records: its tensors, a header (with what a client builds its path model from), inner."""
    weights, shapes = encode_tensors(job.tensors)
    header = ConfigRecord(
        {
            **_header(job.path, job.variant, job.round, job.seed),
            "spec": config.spec,
            "grid": list(config.grid),
            "config-seed": config.seed,
        }
    )
    inner = ConfigRecord(job.inner.model_dump())
    return RecordDict({"weights": weights, "shapes": shapes, "job": header, "inner": inner})


def decode_job(content: RecordDict, path_model: nn.Module) -> Job:
    """The job of `encode_job`, its masks recomputed for `path_model` (the client's own copy of its path)."""
    header = content["job"]
    variant, round, seed = _variant(header), int(header["round"]), int(header["seed"])
    inner = InnerConfig(**{key: content["inner"][key] for key in InnerConfig.model_fields})
    tensors = decode_tensors(content["weights"], content["shapes"])
    masks = round_masks(path_model, variant, round, seed)
    return Job(Path.parse(str(header["path"])), variant, round, seed, inner, tensors, masks)


def encode_upload(upload: Upload) -> RecordDict:
    """An upload as records: its tensors, a header (path, variant, round, seed), its weight and inner loss."""
    arrays, shapes = encode_tensors(upload.tensors)
    metrics = MetricRecord({"weight": upload.weight, "loss": upload.loss, "upload-bytes": upload.nbytes})
    header = ConfigRecord(_header(upload.path, upload.variant, upload.round, upload.seed))
    return RecordDict({"upload": arrays, "shapes": shapes, "header": header, "metrics": metrics})


def decode_upload(content: RecordDict) -> Upload:
    """Inverse of `encode_upload` (the engine checks it against the sender's assignment)."""
    header, metrics = content["header"], content["metrics"]
    tensors = decode_tensors(content["upload"], content["shapes"])
    path, round, seed = Path.parse(str(header["path"])), int(header["round"]), int(header["seed"])
    weight, loss = float(metrics["weight"]), float(metrics["loss"])
    return Upload(path, _variant(header), round, seed, weight, tensors, loss)


# -- server -----------------------------------------------------------------------------------------
class EngineStrategy(Strategy):
    """The engine's rounds as a Flower Strategy: each client gets its own job, the engine closes the round.

    `clients` maps node ids to enrolled client ids. The ArrayRecord that `Strategy.start` passes around
    is the grid's state, returned after every outer step; `rounds` collects `engine.close_round`'s metrics.
    """

    def __init__(self, engine: Engine, clients: Mapping[int, str]):
        self.engine = engine
        self.clients = dict(clients)
        self.rounds: list[dict[str, Any]] = []

    def summary(self) -> None:
        """Log the run's shape."""
        engine = self.engine
        variants = sorted({engine.assignments[c].variant.name for c in self.clients.values()})
        log.info(
            "%d clients on %d paths (grid %s), variants %s, aggregation %s",
            len(self.clients),
            len(engine.paths),
            "x".join(map(str, engine.config.grid)),
            ", ".join(variants),
            engine.config.aggregation.rule,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client: `engine.job` of the open round in wire form."""
        return [
            Message(
                encode_job(self.engine.job(client_id), self.engine.config),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for node, client_id in self.clients.items()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the uploads, then close the round with them in client order (failed or refused
        replies are left out)."""
        received: dict[str, tuple[Upload, Update]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            client_id = self.clients[node]
            try:
                upload = decode_upload(reply.content)
                if upload.round != self.engine.round:
                    raise ValueError(f"update for round {upload.round}, round {self.engine.round} is open")
                received[client_id] = (upload, self.engine.decode(client_id, upload))
            except (KeyError, ValueError) as e:
                log.warning(
                    "round %d: refused the update of %s (node %d): %s", server_round, client_id, node, e
                )
        if not received:
            raise RuntimeError(f"round {server_round}: no client sent a usable update")
        ordered = [received[c] for c in sorted(received)]
        metrics = self.engine.close_round([u for u, _ in ordered], [d for _, d in ordered])
        self.rounds.append(metrics)
        return ArrayRecord(self.engine.model.state_dict()), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the engine evaluates the routed ensemble on the spec's eval set."""
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


def enrol(grid: Grid, engine: Engine, nodes: list[int]) -> dict[int, str]:
    """Ask every node for its partition and routing statistics, then enrol the nodes in partition order.

    The i-th node enrolled is client f"c{i:04d}" with `client_profile(config, i)`; its path, variant and seed
    come from `engine.assign`. Returns {node id: client id}.
    """
    content = RecordDict({"query": ConfigRecord({"spec": engine.config.spec})})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    reports: dict[int, tuple[int, np.ndarray, float]] = {}
    for reply in grid.send_and_receive(messages):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} failed to send its routing statistics: {reply.error.reason}")
        stats = reply.content["stats"]
        feature_sum = reply.content["features"]["sum"].numpy()
        reports[node] = (int(stats["partition-id"]), feature_sum, float(stats["count"]))
    missing = sorted(set(nodes) - set(reports))
    if missing:
        raise RuntimeError(f"no routing statistics from nodes {missing}")
    clients = {}
    for i, node in enumerate(sorted(nodes, key=lambda n: (reports[n][0], n))):
        client_id = f"c{i:04d}"
        engine.assign(client_id, PROFILES[client_profile(engine.config, i)])
        engine.add_features(client_id, *reports[node][1:])
        clients[node] = client_id
    return clients


def run_server(grid: Grid, config: Config, out: FsPath | None = None) -> dict[str, Any]:
    """The ServerApp's work: enrol the nodes, train `config.rounds` rounds with the engine, save the ensemble.

    Returns the config, the spec's headline metric, the ensemble's metrics before training ("initial", when
    the spec has an eval set), each round's metrics (`Engine.close_round`'s), the clients (path, variant,
    examples) and the seconds taken; saves the ensemble checkpoint and results.json to `out` when given.
    """
    started = time.perf_counter()
    spec = load_checked(config)
    engine = Engine(spec, config)
    clients = enrol(grid, engine, wait_for_nodes(grid, config.clients.count or config.n_paths))
    strategy = EngineStrategy(engine, clients)
    initial: dict[str, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0:
            initial.update(engine.evaluate())
            return MetricRecord(initial)
        return MetricRecord({key: strategy.rounds[-1][key] for key in initial})

    strategy.start(
        grid,
        ArrayRecord(engine.model.state_dict()),
        num_rounds=config.rounds - engine.round,
        evaluate_fn=evaluate if spec.eval_data is not None else None,
    )
    assignments, counts = {c: engine.assignments[c] for c in sorted(clients.values())}, engine.feature_counts
    results = {
        "config": config.model_dump(mode="json"),
        "metric": spec.metric,
        "initial": initial,
        "rounds": strategy.rounds,
        "clients": [
            {"client": c, "path": str(a.path), "variant": a.variant.name, "examples": int(counts[c])}
            for c, a in assignments.items()
        ],
        "seconds": time.perf_counter() - started,
    }
    if out is not None:
        engine.ensemble().save(out, extra={"config": results["config"]})
        (FsPath(out) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def make_server_app(
    config: Config | None = None,
    out: FsPath | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp running `run_server`; settings from `config`, else from the run config (`flwr run`).

    `out` (else the run config's "out", when not empty) receives the checkpoint; `report` the results.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = config or config_from_run_config(context.run_config)
        directory = out or (FsPath(str(context.run_config["out"])) if context.run_config.get("out") else None)
        results = run_server(grid, settings, directory)
        if report is not None:
            report(results)

    return app


# -- client -----------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def cached_spec(ref: str) -> Spec:
    """A spec by import string, loaded once per process (a Ray actor runs many nodes)."""
    return load_spec(ref)


@lru_cache(maxsize=4)
def _grid(ref: str, grid: tuple[int, ...], seed: int) -> ModularModel:
    return cached_spec(ref).build(grid, seed)


def node_partition(context: Context) -> tuple[int, int]:
    """This node's (partition-id, num-partitions) from its node config (the simulation engine sets them)."""
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError(
            "this node has no partition-id / num-partitions in its node config "
            "(start a SuperNode with --node-config 'partition-id=0 num-partitions=4')"
        )
    return int(config["partition-id"]), int(config["num-partitions"])


client_app = ClientApp()


@client_app.query()
def routing_statistics(msg: Message, context: Context) -> Message:
    """Reply with this node's partition and the sum and count of its training examples' routing features."""
    spec = cached_spec(str(msg.content["query"]["spec"]))
    partition, partitions = node_partition(context)
    total, count = spec.feature_statistics(spec.data(partition, partitions).train)
    stats = ConfigRecord({"partition-id": partition, "count": count})
    content = RecordDict({"features": ArrayRecord({"sum": Array(total)}), "stats": stats})
    return Message(content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's path for one round on its own data and reply with its outer gradient in wire form."""
    header = msg.content["job"]
    ref, grid = str(header["spec"]), tuple(int(n) for n in header["grid"])
    spec = cached_spec(ref)
    path = Path.parse(str(header["path"]))
    path_model = copy.deepcopy(_grid(ref, grid, int(header["config-seed"])).compose(path))
    job = decode_job(msg.content, path_model)
    train_set = spec.data(*node_partition(context)).train
    batches = train_set.batches(job.inner.batch_size, job.seed)
    worker = Worker(spec, path_model, batches, len(train_set), job.variant)
    if STATE_KEY in context.state:  # this node's own state from its previous rounds, pickled below
        state = pickle.loads(context.state[STATE_KEY]["state"])
        worker.optimizer_state, worker.feedback = state["optimizer"], state["feedback"]
        batches.generator.set_state(state["generator"])
    upload = worker.train_round(job)
    state = {
        "optimizer": worker.optimizer_state,
        "feedback": worker.feedback,
        "generator": batches.generator.get_state(),
    }
    context.state[STATE_KEY] = ConfigRecord({"state": pickle.dumps(state)})
    return Message(encode_upload(upload), reply_to=msg)


server_app = make_server_app()


# -- running a simulation ---------------------------------------------------------------------------
def backend_config(
    cpus_per_client: float = 1, gpus_per_client: float = 0, ray_address: str | None = None
) -> dict[str, Any]:
    """Ray backend settings: resources per virtual client and, for an existing cluster, its address."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}}
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        config["init_args"] = {"address": address}
    return config


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's advice to call `flwr run` instead of `run_simulation` (fedmoe offers `flwr run` too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def run_apps(
    server: ServerApp,
    client: ClientApp,
    nodes: int,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> None:
    """Run a ServerApp and a ClientApp on `nodes` virtual nodes with Flower's simulation engine (Ray)."""
    notice, flower_log = _RunSimulationNotice(), logging.getLogger("flwr")
    flower_log.addFilter(notice)
    try:
        backend = backend_config(cpus_per_client, gpus_per_client, ray_address)
        run_simulation(server, client, nodes, backend_config=backend, verbose_logging=verbose)
    finally:
        flower_log.removeFilter(notice)


def simulate_federation(
    config: Config,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    out: FsPath | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `config` with `config.clients.count` (default: one per path) virtual nodes on Ray (local, or the
    cluster at `ray_address` / $RAY_ADDRESS); node i holds `spec.data(i, n)`.

    Returns what `run_server` returns; raises ValueError for a config Flower cannot run, and what the
    ServerApp raised.
    """
    load_checked(config)
    results: list[dict[str, Any]] = []
    nodes = config.clients.count or config.n_paths
    server = make_server_app(config, out, results.append)
    run_apps(server, client_app, nodes, cpus_per_client, gpus_per_client, ray_address, verbose)
    if not results:
        raise RuntimeError("the simulation ended without results")
    return results[0]
