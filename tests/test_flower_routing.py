"""The Flower runner routes by the clients' data: federated k-means over QUERY messages, a histogram per
node, a worker per cluster, federated evaluation; the ServerApp never loads training data."""

from __future__ import annotations

import dataclasses
import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from fedmoe import Config, Ensemble, LocalClient, load_spec, run_federation  # noqa: E402
from fedmoe.clustering import cluster_stats  # noqa: E402
from fedmoe.config import ClientsConfig, InnerConfig  # noqa: E402
from fedmoe.engine import new_router  # noqa: E402
from fedmoe.router import LearnedRouter  # noqa: E402
from fedmoe.spec import ClientData  # noqa: E402
from fedmoe.strategies.flower import (  # noqa: E402
    bundle,
    decode_routing,
    decode_stats,
    encode_routing,
    encode_stats,
    enrolment_order,
    simulate_federation,
    unbundle,
)

TABULAR = load_spec("examples.tabular:spec")
SERVER_PID = "FEDMOE_TEST_SERVER_PID"


def server_guarded_data(partition: int, partitions: int) -> ClientData:
    """The tabular clients' data, refused in the process whose pid is $FEDMOE_TEST_SERVER_PID.

    The simulation runs the ServerApp in this (pytest's) process and the ClientApps in Ray actors, which
    inherit the variable but not the pid: only the ServerApp's process is refused.
    """
    if os.environ.get(SERVER_PID) == str(os.getpid()):
        raise RuntimeError("training data loaded in the ServerApp's process")
    return TABULAR.data(partition, partitions)


GUARDED = dataclasses.replace(TABULAR, data=server_guarded_data)
CONFIG = Config(
    spec=f"{__name__}:GUARDED",
    grid=(3,),
    rounds=4,
    inner=InnerConfig(steps=30),
    routing={"assign": "data"},
    clients=ClientsConfig(count=3),
)
ORDERS = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]  # the partitions in the order their nodes enrol


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, ...], tuple[dict, Ensemble]]:
    """Three simulations of three nodes (node i holding cluster i of the table), enrolled in three orders,
    with training data refused in the ServerApp's process."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SERVER_PID, str(os.getpid()))
        for order in ORDERS:
            out = tmp_path_factory.mktemp("flower-routing") / "ensemble"
            runs[order] = simulate_federation(CONFIG, out=out, order=order), Ensemble.load(out)
    return runs


def in_process(order: tuple[int, ...]):
    """`run_federation` of the same clients, enrolled in the same order."""
    clients = [LocalClient(TABULAR.data(i, 3)) for i in order]
    return run_federation(TABULAR, CONFIG.with_overrides({"spec": "examples.tabular:spec"}), clients)


def paths_by_partition(clients: list[dict], order: tuple[int, ...]) -> dict[int, set[str]]:
    """{partition: the paths of its node's workers} (the node enrolled j-th holds partition order[j])."""
    return {
        partition: {c["path"] for c in clients if c["client"].startswith(f"c{j:04d}.")}
        for j, partition in enumerate(order)
    }


def test_the_server_app_trains_to_the_end_without_loading_training_data(flower_runs) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SERVER_PID, str(os.getpid()))
        with pytest.raises(RuntimeError, match="ServerApp's process"):
            GUARDED.data(0, 3)  # the guard holds in this process, where the ServerApp ran ...
    for results, _ in flower_runs.values():  # ... (its results came back through memory) and trained
        assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
        assert all(r["client_reports"] == r["updates"] == len(results["clients"]) for r in results["rounds"])


@pytest.mark.parametrize("order", ORDERS)
def test_weights_and_paths_equal_the_in_process_run(flower_runs, order: tuple[int, ...]) -> None:
    results, ensemble = flower_runs[order]
    local = in_process(order)
    assert results["clients"] == local.clients
    flower, expected = ensemble.model.module_states(), local.engine.model.module_states()
    for key in expected:
        for name, t in expected[key].items():
            got = flower[key][name]
            message = f"{key}/{name}: max diff {(got - t).abs().max():.2e}"
            assert torch.allclose(got, t, rtol=1e-4, atol=1e-5), message
    for row, local_row in zip(results["rounds"], local.rounds, strict=True):
        assert row.keys() == local_row.keys()
        assert row["client_examples"] == local_row["client_examples"]
        assert row["client_accuracy"] == pytest.approx(local_row["client_accuracy"], abs=1e-4)


def test_paths_follow_the_data_and_accuracy_not_the_enrolment_order(flower_runs) -> None:
    paths = {
        order: paths_by_partition(results["clients"], order) for order, (results, _) in flower_runs.items()
    }
    first = paths[ORDERS[0]]
    assert all(p == first for p in paths.values()), paths
    majority = {partition: next(iter(p)) for partition, p in first.items() if len(p) == 1}
    assert len(set(majority.values())) == len(majority) == 3  # each node holds one cluster: its own path
    accuracies = [results["rounds"][-1]["accuracy"] for results, _ in flower_runs.values()]
    print(f"accuracy by enrolment order: {dict(zip(ORDERS, np.round(accuracies, 4).tolist()))}")
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies
    assert min(accuracies) > 0.85


def test_round_metrics_carry_the_clients_own_evaluation(flower_runs) -> None:
    held_out = sum(len(TABULAR.data(i, 3).test) for i in range(3))
    for results, _ in flower_runs.values():
        for row in results["rounds"]:
            # each node's held-out examples of its workers' clusters: nearly all of them
            assert 0.95 * held_out < row["client_examples"] <= held_out
            assert row["client_accuracy_min"] <= row["client_accuracy"] <= row["client_accuracy_max"]
            assert (
                row["client_bits_per_byte_min"]
                <= row["client_bits_per_byte"]
                <= row["client_bits_per_byte_max"]
            )


def test_messages_of_several_workers_clusterings_and_enrolment_orders() -> None:
    parts = {
        "c0000.0": RecordDict({"job": ConfigRecord({"a": 1})}),
        "c0000.2": RecordDict({"job": ConfigRecord({"a": 2})}),
    }
    content = bundle(parts, {"run": ConfigRecord({"spec": "x"})})
    assert sorted(content) == ["c0000.0/job", "c0000.2/job", "run"]
    back = unbundle(content)
    assert {w: int(r["job"]["a"]) for w, r in back.items()} == {"c0000.0": 1, "c0000.2": 2}

    rng = np.random.default_rng(0)
    features, centroids, prices = rng.normal(size=(50, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)
    routing = decode_routing(RecordDict({"routing": encode_routing(centroids, prices)}))
    assert np.array_equal(routing[0], centroids) and np.array_equal(routing[1], prices)
    assert decode_routing(RecordDict()) == (None, None)
    for stats in (cluster_stats(features, centroids, prices, 0.5), cluster_stats(features, None)):
        got = decode_stats(encode_stats(stats))
        for field in ("counts", "sums", "squares", "soft"):
            expected = getattr(stats, field)
            assert expected is None and got.soft is None or np.array_equal(getattr(got, field), expected)

    def replies(partitions: dict[int, int]) -> dict[int, RecordDict]:
        return {
            node: RecordDict({"node": ConfigRecord({"partition-id": p})}) for node, p in partitions.items()
        }

    nodes = replies({11: 2, 7: 0, 30: 1})
    assert enrolment_order(nodes) == [7, 30, 11]
    assert enrolment_order(nodes, [2, 0, 1]) == [11, 7, 30]
    with pytest.raises(ValueError, match="not an order"):
        enrolment_order(nodes, [0, 1])
    with pytest.raises(ValueError, match="not an order"):
        enrolment_order(replies({1: 0, 2: 0}), [0, 0])


def test_the_learned_router_trains_through_flower_as_in_process(tmp_path) -> None:
    config = CONFIG.with_overrides(
        {"spec": "examples.tabular:spec", "rounds": 2, "inner.steps": 5, "routing.router": "learned"}
    )
    simulate_federation(config, out=tmp_path)
    flower, local = Ensemble.load(tmp_path), run_federation(TABULAR, config).ensemble
    assert isinstance(flower.router, LearnedRouter)
    untrained = new_router(flower.router.in_dim, config).tensors()
    assert all(not torch.equal(t, untrained[n]) for n, t in flower.router.tensors().items())
    expected = local.router.tensors() | {
        f"{key}/{name}": t
        for key, states in local.model.module_states().items()
        for name, t in states.items()
    }
    got = flower.router.tensors() | {
        f"{key}/{name}": t
        for key, states in flower.model.module_states().items()
        for name, t in states.items()
    }
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.allclose(got[name], t, rtol=1e-4, atol=1e-5), (
            f"{name}: {(got[name] - t).abs().max():.2e}"
        )
