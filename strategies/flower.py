"""The Flower runner: the round engine (`fedmoe.engine.Engine`) driven over Flower's Message API.

The only module of fedmoe that imports flwr. The ServerApp holds the engine and never any data: it waits
for its nodes and enrols them in the order of the partitions they hold (the node of the i-th partition is
client f"c{i:04d}", its device profile chosen as `fedmoe.federation.default_clients` chooses it; `order`
changes that order). How a node gets its paths follows `routing.assign`:

- "data": federated k-means, one QUERY ("query.cluster") per pass carrying the engine's proposal, each
  node answering `fedmoe.clustering.cluster_stats` of its training features; then one QUERY
  ("query.histogram") with the converged centroids and prices, each node answering its count of examples
  per cluster, and `engine.assign_by_data` gives it a worker per cluster it holds enough of.
- "turn": one QUERY ("query.features"), each node answering the sum and count of its routing features, and
  `engine.assign` gives it the next path in turn.

`EngineStrategy` then sends each node ONE message a round carrying its workers' `engine.job`s, and closes
the round with `engine.close_round` over all workers' uploads in enrolment order (the configured
aggregation rule and the DiLoCo outer step). The ClientApp loads the spec by its import string and its own
data with `spec.data(partition-id, num-partitions)` of its node config (once per process, with its routing
features), trains each worker with the shared `Worker` on its examples of the worker's cluster (all of
them in turn mode) and evaluates it on its held-out examples of that cluster: the evaluation travels with
the upload, and the engine's round metrics carry it (client_<metric>, _min, _max). Nothing but
aggregates leaves a node: cluster statistics, a histogram, outer gradients, metrics. The same spec,
`Config` and enrolment order reach the same weights as `fedmoe.run_federation`.

On the wire a `QTensor` is two uint8 arrays in an ArrayRecord (`name/payload`, `name/scales`) and its
bit-width and shape in a ConfigRecord (`name/bits`, `name/shape`); a message for several workers holds
worker w's record r under "w/r" (see `bundle`). A worker's optimiser state, error-feedback residuals and
batch-sampler state stay in its node's `Context.state` between rounds, keyed by worker id (the simulation
engine keeps each node's Context and hands it to whichever Ray actor runs the node next).

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

import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path as FsPath  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedmoe.assignment import PROFILES, parse_profiles  # noqa: E402
from fedmoe.clustering import ClusterStats, cluster_stats, histogram  # noqa: E402
from fedmoe.compress.quant import QTensor  # noqa: E402
from fedmoe.config import Config, InnerConfig  # noqa: E402
from fedmoe.engine import NETWORK_SCHEMES, Engine  # noqa: E402
from fedmoe.modular import Path  # noqa: E402
from fedmoe.outer import Update  # noqa: E402
from fedmoe.spec import Spec, load_spec  # noqa: E402
from fedmoe.train import Compute  # noqa: E402
from fedmoe.worker import ROUTER, Job, LocalExamples, Upload, Variant  # noqa: E402

log = logging.getLogger("fedmoe.flower")

STATE_KEY = "fedmoe-workers"
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


def encode_job(job: Job, cluster: int | None = None) -> RecordDict:
    """A job as records: its tensors, a header (path, variant, round, seed, and the cluster whose examples
    the worker trains on, when routing by data), inner."""
    weights, shapes = encode_tensors(job.tensors)
    header = ConfigRecord(_header(job.path, job.variant, job.round, job.seed))
    if cluster is not None:
        header["cluster"] = cluster
    inner = ConfigRecord(job.inner.model_dump())
    return RecordDict({"weights": weights, "shapes": shapes, "job": header, "inner": inner})


def job_cluster(content: RecordDict) -> int | None:
    """The cluster of an `encode_job` content (None: the worker trains on all its node's examples)."""
    header = content["job"]
    return int(header["cluster"]) if "cluster" in header else None


def decode_job(content: RecordDict) -> Job:
    """The job of `encode_job` (a width or dense sub-model's: no masks, see `Job`)."""
    header = content["job"]
    variant, round, seed = _variant(header), int(header["round"]), int(header["seed"])
    inner = InnerConfig(**{key: content["inner"][key] for key in InnerConfig.model_fields})
    tensors = decode_tensors(content["weights"], content["shapes"])
    return Job(Path.parse(str(header["path"])), variant, round, seed, inner, tensors)


def encode_upload(upload: Upload) -> RecordDict:
    """An upload as records: its tensors, a header (path, variant, round, seed), its weight and inner loss,
    and its evaluation (the worker's metrics on its held-out examples, and their number)."""
    arrays, shapes = encode_tensors(upload.tensors)
    metrics = MetricRecord({"weight": upload.weight, "loss": upload.loss, "upload-bytes": upload.nbytes})
    header = ConfigRecord(_header(upload.path, upload.variant, upload.round, upload.seed))
    evaluation = MetricRecord({name: float(value) for name, value in upload.evaluation.items()})
    return RecordDict(
        {"upload": arrays, "shapes": shapes, "header": header, "metrics": metrics, "evaluation": evaluation}
    )


def decode_upload(content: RecordDict) -> Upload:
    """Inverse of `encode_upload` (the engine checks it against the sender's assignment)."""
    header, metrics = content["header"], content["metrics"]
    tensors = decode_tensors(content["upload"], content["shapes"])
    path, round, seed = Path.parse(str(header["path"])), int(header["round"]), int(header["seed"])
    weight, loss = float(metrics["weight"]), float(metrics["loss"])
    evaluation = {name: float(value) for name, value in content.get("evaluation", {}).items()}
    return Upload(path, _variant(header), round, seed, weight, tensors, loss, evaluation)


def bundle(parts: Mapping[str, RecordDict], shared: Mapping[str, Any] | None = None) -> RecordDict:
    """Several workers' records in one message: worker w's record r under "w/r", beside `shared` records
    (names without "/")."""
    content = RecordDict(dict(shared or {}))
    for worker_id, records in parts.items():
        for name, record in records.items():
            content[f"{worker_id}/{name}"] = record
    return content


def unbundle(content: RecordDict) -> dict[str, RecordDict]:
    """Inverse of `bundle`: {worker id: its records} (the shared records left out)."""
    parts: dict[str, RecordDict] = {}
    for key, record in content.items():
        worker_id, slash, name = key.rpartition("/")
        if slash:
            parts.setdefault(worker_id, RecordDict())[name] = record
    return parts


def encode_routing(centroids: np.ndarray, prices: np.ndarray) -> ArrayRecord:
    """Centroids and prices (a clustering proposal, or the converged clustering) as an ArrayRecord."""
    return ArrayRecord({"centroids": Array(np.asarray(centroids)), "prices": Array(np.asarray(prices))})


def decode_routing(content: RecordDict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The centroids and prices of a message's "routing" record; (None, None) without one (the first pass
    of clustering: everything in one cluster)."""
    if "routing" not in content:
        return None, None
    record = content["routing"]
    return record["centroids"].numpy(), record["prices"].numpy()


def encode_stats(stats: ClusterStats) -> ArrayRecord:
    """A node's `ClusterStats` as an ArrayRecord."""
    names = ("counts", "sums", "squares", "soft", "products")
    return ArrayRecord(
        {name: Array(getattr(stats, name)) for name in names if getattr(stats, name) is not None}
    )


def decode_stats(record: ArrayRecord) -> ClusterStats:
    """Inverse of `encode_stats` (the engine checks shapes and values)."""
    soft, products = (record[name].numpy() if name in record else None for name in ("soft", "products"))
    return ClusterStats(
        record["counts"].numpy(), record["sums"].numpy(), record["squares"].numpy(), soft, products
    )


# -- server -----------------------------------------------------------------------------------------
class EngineStrategy(Strategy):
    """The engine's rounds as a Flower Strategy: each node gets its workers' jobs; the engine closes rounds.

    `workers` maps node ids to the ids of their enrolled workers (one client id in turn mode, "<client
    id>.<cluster>" per cluster when routing by data). The ArrayRecord that `Strategy.start` passes around
    is the grid's state, returned after every outer step; `rounds` collects `engine.close_round`'s metrics.
    """

    def __init__(self, engine: Engine, workers: Mapping[int, Sequence[str]]):
        self.engine = engine
        self.workers = {node: list(ids) for node, ids in workers.items()}
        self.rounds: list[dict[str, Any]] = []

    def summary(self) -> None:
        """Log the run's shape."""
        engine = self.engine
        ids = [w for ids in self.workers.values() for w in ids]
        variants = sorted({engine.assignments[w].variant.name for w in ids})
        log.info(
            "%d nodes, %d workers on %d paths (grid %s, routing %s), variants %s, aggregation %s",
            len(self.workers),
            len(ids),
            len(engine.paths),
            "x".join(map(str, engine.config.grid)),
            engine.config.routing.assign,
            ", ".join(variants),
            engine.config.aggregation.rule,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node: its workers' `engine.job`s of the open round in wire form."""
        return [
            Message(
                train_content(self.engine, ids),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for node, ids in self.workers.items()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the uploads, then close the round with them in enrolment order (failed nodes,
        missing and refused uploads are left out)."""
        received: dict[str, tuple[Upload, Update]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            parts = unbundle(reply.content)
            for worker_id in self.workers[node]:
                try:
                    if worker_id not in parts:
                        raise ValueError("no update in the reply")
                    upload = decode_upload(parts[worker_id])
                    if upload.round != self.engine.round:
                        raise ValueError(
                            f"update for round {upload.round}, round {self.engine.round} is open"
                        )
                    received[worker_id] = (upload, self.engine.decode(worker_id, upload))
                except (KeyError, ValueError) as e:
                    log.warning(
                        "round %d: refused the update of %s (node %d): %s", server_round, worker_id, node, e
                    )
        if not received:
            raise RuntimeError(f"round {server_round}: no client sent a usable update")
        ordered = [received[w] for w in self.engine.assignments if w in received]
        metrics = self.engine.close_round([u for u, _ in ordered], [d for _, d in ordered])
        self.rounds.append(metrics)
        return ArrayRecord(self.engine.model.state_dict()), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No evaluation messages: each upload carries its worker's evaluation on its node's held-out data,
        and the engine evaluates the routed ensemble on the spec's eval set."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see `configure_evaluate`)."""
        return None


def train_content(engine: Engine, worker_ids: Sequence[str]) -> RecordDict:
    """A node's train message: its workers' jobs (`bundle`d), the spec its path models are built from and
    where they train ("run"), and, when routing by data, the clustering it selects each worker's examples
    with ("routing")."""
    config = engine.config
    shared: dict[str, Any] = {
        "run": ConfigRecord(
            {
                "spec": config.spec,
                "device": config.clients.device,
                "precision": config.clients.precision,
            }
        )
    }
    if engine.kmeans is not None:
        shared["routing"] = encode_routing(*engine.routing_state())
    jobs = {w: encode_job(engine.job(w), engine.assignments[w].cluster) for w in worker_ids}
    return bundle(jobs, shared)


def wait_for_nodes(grid: Grid, n: int, timeout_s: float = NODE_WAIT_S) -> list[int]:
    """The first n node ids in id order, once at least n nodes are connected."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {n} nodes connected within {timeout_s:.0f} s")
        time.sleep(0.5)
    return nodes[:n]


def ask(grid: Grid, nodes: Sequence[int], action: str, content: RecordDict) -> dict[int, RecordDict]:
    """Send every node a "query.<action>" message and return the replies' content by node; RuntimeError
    when a node fails or does not answer."""
    message_type = f"{MessageType.QUERY}.{action}"
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node in nodes]
    replies: dict[int, RecordDict] = {}
    for reply in grid.send_and_receive(messages):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} failed to answer {message_type}: {reply.error.reason}")
        replies[node] = reply.content
    missing = sorted(set(nodes) - set(replies))
    if missing:
        raise RuntimeError(f"no answer to {message_type} from nodes {missing}")
    return replies


def enrolment_order(replies: Mapping[int, RecordDict], order: Sequence[int] | None = None) -> list[int]:
    """The nodes that answered, in the order they enrol: by the partition each holds, or the partitions
    listed in `order` (each exactly once)."""
    partitions = {node: int(content["node"]["partition-id"]) for node, content in replies.items()}
    if order is None:
        return sorted(partitions, key=lambda node: (partitions[node], node))
    by_partition = {p: node for node, p in partitions.items()}
    if len(by_partition) != len(partitions) or sorted(order) != sorted(by_partition):
        raise ValueError(
            f"order {list(order)} is not an order of the nodes' partitions {sorted(partitions.values())}"
        )
    return [by_partition[p] for p in order]


def cluster(grid: Grid, engine: Engine, nodes: Sequence[int], order: Sequence[int] | None = None) -> None:
    """Run the engine's federated k-means to convergence, every node answering `cluster_stats` of its own
    training features; the statistics are summed in enrolment order."""
    while not engine.clustered:
        centroids, prices, softness, products = engine.cluster_proposal()
        query = {"spec": engine.config.spec, "softness": float(softness), "products": products}
        content = RecordDict({"query": ConfigRecord(query)})
        if centroids is not None:
            content["routing"] = encode_routing(centroids, prices)
        replies = ask(grid, nodes, "cluster", content)
        stats = [decode_stats(replies[node]["stats"]) for node in enrolment_order(replies, order)]
        engine.cluster_update(sum(stats[1:], stats[0]))


def enrol(
    grid: Grid, engine: Engine, nodes: Sequence[int], order: Sequence[int] | None = None
) -> dict[int, list[str]]:
    """Give every node its paths, enrolling the nodes in partition order (or `order`, see `enrolment_order`).

    The i-th node enrolled is client f"c{i:04d}" with `client_profile(config, i)`. Routing by data: the
    nodes cluster their features (`cluster`), answer their histograms, and `engine.assign_by_data` gives
    each a worker per cluster it holds enough of. In turn: they answer their routing features' sum and
    count, and `engine.assign` gives each the next path. Returns {node id: its worker ids}.
    """
    query = ConfigRecord({"spec": engine.config.spec})
    if engine.kmeans is not None:
        cluster(grid, engine, nodes, order)
        content = RecordDict({"query": query, "routing": encode_routing(*engine.routing_state())})
        replies = ask(grid, nodes, "histogram", content)
    else:
        replies = ask(grid, nodes, "features", RecordDict({"query": query}))
    workers: dict[int, list[str]] = {}
    for i, node in enumerate(enrolment_order(replies, order)):
        client_id, reply = f"c{i:04d}", replies[node]
        profile = PROFILES[client_profile(engine.config, i)]
        if engine.kmeans is not None:
            workers[node] = list(
                engine.assign_by_data(client_id, profile, reply["histogram"]["counts"].numpy())
            )
        else:
            engine.assign(client_id, profile)
            engine.add_features(client_id, reply["features"]["sum"].numpy(), float(reply["count"]["count"]))
            workers[node] = [client_id]
    return workers


def run_server(
    grid: Grid, config: Config, out: FsPath | None = None, order: Sequence[int] | None = None
) -> dict[str, Any]:
    """The ServerApp's work: enrol the nodes (in partition order, or the partitions in `order`), train
    `config.rounds` rounds with the engine, save the ensemble.

    Returns the config, the spec's headline metric, the ensemble's metrics before training ("initial", when
    the spec has an eval set), each round's metrics (`Engine.close_round`'s, with the clients' own
    evaluation), the workers in enrolment order (worker id, path, variant, examples) and the seconds taken;
    saves the ensemble checkpoint and results.json to `out` when given.
    """
    started = time.perf_counter()
    spec = load_checked(config)
    engine = Engine(spec, config)
    workers = enrol(grid, engine, wait_for_nodes(grid, config.clients.count or config.n_paths), order)
    strategy = EngineStrategy(engine, workers)
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

    def examples(worker_id: str) -> int:
        a = engine.assignments[worker_id]
        return a.examples if a.cluster is not None else int(engine.feature_counts[worker_id])

    results = {
        "config": config.model_dump(mode="json"),
        "metric": spec.metric,
        "initial": initial,
        "rounds": strategy.rounds,
        "clients": [
            {"client": w, "path": str(a.path), "variant": a.variant.name, "examples": examples(w)}
            for w, a in engine.assignments.items()
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
    order: Sequence[int] | None = None,
) -> ServerApp:
    """A ServerApp running `run_server`; settings from `config`, else from the run config (`flwr run`).

    `out` (else the run config's "out", when not empty) receives the checkpoint; `report` the results;
    `order` lists the partitions in the order their nodes enrol (default: 0, 1, ...).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = config or config_from_run_config(context.run_config)
        directory = out or (FsPath(str(context.run_config["out"])) if context.run_config.get("out") else None)
        results = run_server(grid, settings, directory, order)
        if report is not None:
            report(results)

    return app


# -- client -----------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def cached_spec(ref: str) -> Spec:
    """A spec by import string, loaded once per process (a Ray actor runs many nodes)."""
    return load_spec(ref)


@lru_cache(maxsize=32)
def node_examples(ref: str, partition: int, partitions: int) -> LocalExamples:
    """A node's own data, `spec.data(partition, partitions)`, with its routing features: loaded and computed
    once per process."""
    spec = cached_spec(ref)
    data = spec.data(partition, partitions)
    return LocalExamples(spec, data.train, data.test)


def node_partition(context: Context) -> tuple[int, int]:
    """This node's (partition-id, num-partitions) from its node config (the simulation engine sets them)."""
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError(
            "this node has no partition-id / num-partitions in its node config "
            "(start a SuperNode with --node-config 'partition-id=0 num-partitions=4')"
        )
    return int(config["partition-id"]), int(config["num-partitions"])


def answer(msg: Message, context: Context, records: Mapping[str, Any]) -> Message:
    """A reply to a query: `records` and the node's partition ("node")."""
    partition, partitions = node_partition(context)
    node = ConfigRecord({"partition-id": partition, "num-partitions": partitions})
    return Message(RecordDict({"node": node, **records}), reply_to=msg)


client_app = ClientApp()


@client_app.query("features")
def feature_statistics(msg: Message, context: Context) -> Message:
    """Paths in turn: the sum and number of this node's training examples' routing features."""
    examples = node_examples(str(msg.content["query"]["spec"]), *node_partition(context))
    records = {
        "features": ArrayRecord({"sum": Array(examples.features.sum(0))}),
        "count": ConfigRecord({"count": len(examples.train)}),
    }
    return answer(msg, context, records)


@client_app.query("cluster")
def clustering_statistics(msg: Message, context: Context) -> Message:
    """A pass of federated k-means: this node's `cluster_stats` for the proposal in the message."""
    query = msg.content["query"]
    features = node_examples(str(query["spec"]), *node_partition(context)).features
    routing = decode_routing(msg.content)
    stats = cluster_stats(features, *routing, float(query["softness"]), bool(query["products"]))
    return answer(msg, context, {"stats": encode_stats(stats)})


@client_app.query("histogram")
def cluster_histogram(msg: Message, context: Context) -> Message:
    """This node's count of training examples per cluster of the converged clustering in the message."""
    features = node_examples(str(msg.content["query"]["spec"]), *node_partition(context)).features
    counts = histogram(features, *decode_routing(msg.content))
    return answer(msg, context, {"histogram": ArrayRecord({"counts": Array(counts)})})


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train each of this node's workers one round on its examples (of its cluster, when routing by data),
    evaluate it on the node's held-out examples of that cluster, and reply with all their uploads. The
    worker sent the learned router ("router/" tensors) trains it on all the node's features, labelled with
    their clusters."""
    run = msg.content["run"]
    ref = str(run["spec"])
    examples = node_examples(ref, *node_partition(context))
    centroids, prices = decode_routing(msg.content)
    routing = None if centroids is None else (centroids, prices)
    states = context.state[STATE_KEY] if STATE_KEY in context.state else ConfigRecord()
    uploads = {}
    for worker_id, content in sorted(unbundle(msg.content).items()):
        job = decode_job(content)
        path_model = cached_spec(ref).build_path(job.path, shapes_only=job.variant.sliced)
        # the worker sent "router/" tensors also trains the learned router
        trains_router = any(name.startswith(ROUTER) for name in job.tensors)
        cluster = job_cluster(content)
        compute = Compute.of(str(run["device"]), str(run["precision"]))  # on the node: its own devices
        worker = examples.worker(
            path_model, job.variant, job.seed, job.inner.batch_size, cluster, routing, trains_router, compute
        )
        if worker_id in states:  # this worker's own state from its previous rounds, pickled below
            worker.load_state(*pickle.loads(states[worker_id]))
        uploads[worker_id] = encode_upload(worker.train_round(job))
        states[worker_id] = pickle.dumps(worker.state())
    context.state[STATE_KEY] = states
    return Message(bundle(uploads), reply_to=msg)


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
    order: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run `config` with `config.clients.count` (default: one per path) virtual nodes on Ray (local, or the
    cluster at `ray_address` / $RAY_ADDRESS); node i holds `spec.data(i, n)`, and the nodes enrol in
    partition order, or the partitions in `order` (the node of partition order[j] is client j).

    Returns what `run_server` returns; raises ValueError for a config Flower cannot run, and what the
    ServerApp raised.
    """
    load_checked(config)
    results: list[dict[str, Any]] = []
    nodes = config.clients.count or config.n_paths
    if order is not None and sorted(order) != list(range(nodes)):
        raise ValueError(f"order {list(order)} is not an order of the partitions 0..{nodes - 1}")
    server = make_server_app(config, out, results.append, order)
    run_apps(server, client_app, nodes, cpus_per_client, gpus_per_client, ray_address, verbose)
    if not results:
        raise RuntimeError("the simulation ended without results")
    return results[0]
