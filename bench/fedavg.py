"""The peer baseline of bench/communication.py: Flower's stock FedAvg on a spec's dense model.

The dense model is the spec's grid of one module per level (`spec.build((1,) * levels)`). Client i of n
trains on the data the fedmoe client i holds (`spec.data(i, n)`), or on an iid part of all those clients'
data together (FedAvg's best case), and uploads its fp32 weights every round.

Ray's workers import this module by name: run it as a script from this folder (Ray adds the script's
folder to their path), or put the folder on PYTHONPATH.
"""

from __future__ import annotations

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import math  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedmoe.config import DEFAULT_SPEC, InnerConfig  # noqa: E402
from fedmoe.data import iid as iid_parts  # noqa: E402
from fedmoe.modular import ModularModel, Path  # noqa: E402
from fedmoe.spec import Examples, Spec  # noqa: E402
from fedmoe.strategies.flower import cached_spec, node_partition, run_apps  # noqa: E402
from fedmoe.train import train_local  # noqa: E402


def dense_model(spec: Spec, seed: int = 0) -> ModularModel:
    """The spec's dense model: a grid of one module per level."""
    return spec.build((1,) * spec.default_levels, seed)


def client_examples(
    spec: Spec, partition: int, partitions: int, iid: bool = False, seed: int = 0
) -> Examples:
    """The training examples of client `partition`: fedmoe's client's own, or an iid part of all clients'."""
    if not iid:
        return spec.data(partition, partitions).train
    parts = [spec.data(i, partitions).train for i in range(partitions)]
    everything = Examples(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]))
    return everything.subset(iid_parts(len(everything), partitions, seed=seed)[partition])


fedavg_client_app = ClientApp()


@fedavg_client_app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Train the dense model the configured local epochs on this node's examples; reply with the weights."""
    config = msg.content["config"]
    spec = cached_spec(str(config["spec"]))
    partition, partitions = node_partition(context)
    seed, batch_size = int(config["seed"]), int(config["batch-size"])
    train = client_examples(spec, partition, partitions, bool(config["iid"]), seed)
    model = dense_model(spec, seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    steps = int(config["epochs"]) * math.ceil(len(train) / batch_size)
    inner = InnerConfig(steps=steps, lr=float(config["lr"]), batch_size=batch_size, schedule="constant")
    batches = train.batches(batch_size, seed + 1000 * partition + int(config["server-round"]))
    dense = model.compose(Path((0,) * len(model.grid)))
    loss, _ = train_local(dense, batches, inner, loss_fn=spec.loss, optimizer=spec.optimizer)
    state = model.state_dict()
    metrics = MetricRecord(
        {
            "num-examples": len(train),
            "loss": loss,
            "local-steps": steps,
            "upload-bytes": sum(t.numel() * t.element_size() for t in state.values()),
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def fedavg_baseline(
    clients: int,
    rounds: int,
    spec: str = DEFAULT_SPEC,
    epochs: int = 1,
    lr: float = 3e-3,
    batch_size: int = 32,
    iid: bool = False,
    seed: int = 0,
    cpus_per_client: float = 1,
    gpus_per_client: float = 0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Flower's FedAvg on the spec's dense model, each client `epochs` local epochs of the spec's optimiser.

    Returns the spec's headline metric on its eval set after every round (server side), the bytes each
    client uploaded (its fp32 weights) and its local steps (FedAvg's mean over clients, weighted by examples).
    """
    if cached_spec(spec).eval_data is None:
        raise ValueError(f"spec {spec!r} has no eval set to score the dense model on")
    results: list[dict[str, Any]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        problem = cached_spec(spec)
        model = dense_model(problem, seed)
        dense, examples = model.compose(Path((0,) * len(model.grid))), problem.eval_data()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord({problem.metric: problem.evaluate(dense, examples)[problem.metric]})

        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        train_config = ConfigRecord(
            {"spec": spec, "epochs": epochs, "lr": lr, "batch-size": batch_size, "iid": iid, "seed": seed}
        )
        initial = ArrayRecord(model.state_dict())
        result = strategy.start(grid, initial, rounds, train_config=train_config, evaluate_fn=evaluate)
        results.append(
            {
                "metric": problem.metric,
                "rounds": [
                    {
                        "round": r,
                        problem.metric: float(result.evaluate_metrics_serverapp[r][problem.metric]),
                        "loss": float(m["loss"]),
                        "upload_bytes_per_client": round(float(m["upload-bytes"])),
                        "local_steps": float(m["local-steps"]),
                    }
                    for r, m in sorted(result.train_metrics_clientapp.items())
                ],
            }
        )

    run_apps(server, fedavg_client_app, clients, cpus_per_client, gpus_per_client, ray_address, verbose)
    if not results:
        raise RuntimeError("the simulation ended without results")
    return results[0]
