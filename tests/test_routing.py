"""Paths follow the clients' data: federated k-means, a histogram per client, a worker per cluster."""

import itertools

import numpy as np
import pytest

from fedmoe import Config, LocalClient, load_spec, run_federation
from fedmoe.config import InnerConfig

TABULAR = load_spec("examples.tabular:spec")
BY_DATA = Config(grid=(3,), rounds=4, inner=InnerConfig(steps=30), routing={"assign": "data"})


def by_data(order: tuple[int, ...]) -> tuple[float, dict[int, set[str]], list[dict]]:
    """Three clients, client i holding cluster i of the table, joining in `order`: accuracy, their paths."""
    clients = [LocalClient(TABULAR.data(i, 3), "fp32") for i in order]
    result = run_federation(TABULAR, BY_DATA, clients)
    paths: dict[int, set[str]] = {}
    for position, data_index in enumerate(order):
        prefix = f"c{position:04d}."
        paths[data_index] = {c["path"] for c in result.clients if c["client"].startswith(prefix)}
    return result.rounds[-1]["accuracy"], paths, result.rounds


def test_the_result_does_not_depend_on_join_order() -> None:
    runs = {order: by_data(order) for order in itertools.permutations(range(3)) if order[0] != 2}
    accuracies = [accuracy for accuracy, _, _ in runs.values()]
    print(f"accuracy by join order: { {o: round(a, 4) for o, (a, _, _) in runs.items()} }")
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies
    first = next(iter(runs.values()))[1]
    # a client's path(s) follow its data, not its turn
    assert all(paths == first for _, paths, _ in runs.values())
    majority = {i: next(iter(p)) for i, p in first.items() if len(p) == 1}
    assert len(set(majority.values())) == len(majority) == 3  # each client holds one cluster: its own path
    assert min(accuracies) > 0.85


def test_clients_evaluate_their_paths_on_their_own_held_out_data() -> None:
    _, _, rounds = by_data((0, 1, 2))
    last = rounds[-1]
    assert last["client_reports"] == 3 and last["client_examples"] > 0
    assert last["client_accuracy_min"] <= last["client_accuracy"] <= last["client_accuracy_max"]


def test_a_client_whose_data_spans_clusters_trains_each_of_its_clusters() -> None:
    train = TABULAR.data(0, 1).train  # all the rows
    half = np.arange(len(train)) % 2 == 0
    clients = [
        LocalClient(train.subset(np.flatnonzero(half))),
        LocalClient(train.subset(np.flatnonzero(~half))),
    ]
    result = run_federation(TABULAR, BY_DATA.model_copy(update={"rounds": 1}), clients)
    for prefix in ("c0000.", "c0001."):
        mine = [c for c in result.clients if c["client"].startswith(prefix)]
        assert sorted(c["path"] for c in mine) == ["0", "1", "2"]  # iid data: a worker on every cluster
        assert sum(c["examples"] for c in mine) == len(train) // 2


def test_histograms_are_checked() -> None:
    from fedmoe.assignment import PROFILES
    from fedmoe.engine import Engine

    engine = Engine(TABULAR, BY_DATA)
    with pytest.raises(ValueError, match="once federated k-means has converged"):
        engine.assign_by_data("c0", PROFILES["fp32"], [1, 2, 3])
    features = TABULAR.features(TABULAR.data(0, 1).train)
    from fedmoe.federation import cluster

    cluster(engine, [features])
    for bad in ([1, 2], [1, -2, 3], [0.5, 1, 1], [0, 0, 0], [np.nan, 1, 1]):
        with pytest.raises(ValueError):
            engine.assign_by_data("c0", PROFILES["fp32"], bad)
    with pytest.raises(ValueError, match="assign_by_data"):
        engine.assign("c0", PROFILES["fp32"])


def test_the_learned_router_is_trained_by_fedavg_alongside_the_experts() -> None:
    from fedmoe.clustering import nearest
    from fedmoe.engine import new_router
    from fedmoe.router import LearnedRouter

    routing = BY_DATA.routing.model_copy(update={"router": "learned"})
    config = BY_DATA.model_copy(update={"routing": routing, "rounds": 4})
    result = run_federation(TABULAR, config, [LocalClient(TABULAR.data(i, 3)) for i in range(3)])
    router = result.engine.ensemble().router
    assert isinstance(router, LearnedRouter)
    assert sum(c["client"].endswith(".0") for c in result.clients) >= 1
    features = TABULAR.features(TABULAR.data(0, 1).train)
    labels = nearest(features, *result.engine.routing_state())

    def accuracy(r: LearnedRouter) -> float:
        return float((r.probs(features).argmax(-1).numpy() == labels).mean())

    trained, untrained = accuracy(router), accuracy(new_router(20, config))
    print(f"learned router: cluster accuracy {trained:.3f}, untrained {untrained:.3f}")
    assert trained > 0.8 and trained > untrained + 0.3
    with pytest.raises(ValueError, match="learns the clusters"):
        Config(routing={"router": "learned", "assign": "turn"})
