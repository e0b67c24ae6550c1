"""Routing by data over gRPC: federated k-means with SDK clients, a histogram per client, a worker per
cluster, federated evaluation; a coordinator that never loads training data; bad aggregates refused."""

import functools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from fedmoe import Config, Ensemble, LocalClient, load_spec, run_federation
from fedmoe.assignment import PROFILES
from fedmoe.clients import run
from fedmoe.clients.runtime import (
    Crew,
    Retry,
    connect,
    join,
    prepare_data,
    proposal_arrays,
    pull_job,
    push_frames,
)
from fedmoe.clustering import cluster_stats, histogram, upper_triangles
from fedmoe.security import given_enrolment
from fedmoe.server.coordinator import Coordinator, Rejected
from fedmoe.server.service import start_server
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc

TESTS = Path(__file__).resolve().parent
SPEC = load_spec("examples.tabular:spec")
CONFIG = Config(
    spec="examples.tabular:spec",
    grid=(3,),
    rounds=4,
    inner={"steps": 30},
    routing={"assign": "data"},
    policy={"min_clients": 3},
)
ORDERS = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]  # client i (holding cluster i of the table) joins at its place
RETRY = Retry("coordinator", 10.0)


def federation(
    order: tuple[int, ...], state: Path, config: Config = CONFIG
) -> tuple[Coordinator, dict[int, dict]]:
    """An in-process coordinator and three SDK clients over gRPC, client i holding spec.data(i, 3), joining
    in `order`; the coordinator and each client's summary."""
    coordinator = Coordinator(config, state)
    server, port = start_server(coordinator, "127.0.0.1:0")
    summaries: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            summaries[i] = run(
                f"127.0.0.1:{port}", SPEC, partition=i, partitions=3, poll_s=0.02, timeout_s=120
            )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = []
    try:
        for place, i in enumerate(order):
            threads.append(threading.Thread(target=client, args=(i,), daemon=True))
            threads[-1].start()
            deadline = time.monotonic() + 60
            while len(coordinator.members) <= place and not errors:  # the next joins after this one
                assert time.monotonic() < deadline, "a client did not join"
                time.sleep(0.01)
        for t in threads:
            t.join(120)
    finally:
        server.stop(0).wait()
    assert not errors, errors
    return coordinator, summaries


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, ...], tuple]:
    """Per join order: the coordinator, the clients' summaries, and the in-process run of the same order."""
    out = {}
    for order in ORDERS:
        coordinator, summaries = federation(order, tmp_path_factory.mktemp("state"))
        local = run_federation(SPEC, CONFIG, [LocalClient(SPEC.data(i, 3)) for i in order])
        out[order] = coordinator, summaries, local
    return out


def test_every_join_order_reaches_the_weights_of_the_in_process_runner(runs) -> None:
    for order, (coordinator, _, local) in runs.items():
        assert coordinator.engine.assignments == local.engine.assignments
        ours, theirs = coordinator.engine.model.module_states(), local.engine.model.module_states()
        difference = max((ours[k][n] - theirs[k][n]).abs().max().item() for k in ours for n in ours[k])
        print(f"join order {order}: max weight difference to the in-process runner {difference:.2e}")
        assert difference < 1e-4
        assert coordinator.finished and [m["updates"] for m in coordinator.metrics] == [3] * 4


def test_paths_and_accuracy_follow_the_clients_data_not_their_join_order(runs) -> None:
    paths = {order: {i: summaries[i]["path"] for i in order} for order, (_, summaries, _) in runs.items()}
    accuracy = {order: coordinator.metrics[-1]["accuracy"] for order, (coordinator, _, _) in runs.items()}
    print(f"paths by join order {paths}, accuracy {accuracy}")
    first = paths[ORDERS[0]]
    assert all(p == first for p in paths.values())
    assert sorted(first.values()) == ["0", "1", "2"]  # each client holds one cluster: its own path
    assert max(accuracy.values()) - min(accuracy.values()) <= 0.01


def test_round_metrics_carry_the_clients_evaluation_of_their_paths(runs) -> None:
    coordinator, summaries, local = runs[ORDERS[0]]
    for metrics in coordinator.metrics:
        assert metrics["client_reports"] == 3 and metrics["client_examples"] > 0
        assert metrics["client_accuracy_min"] <= metrics["client_accuracy"] <= metrics["client_accuracy_max"]
    assert coordinator.metrics[-1]["client_accuracy"] == pytest.approx(local.rounds[-1]["client_accuracy"])
    assert all(s["rounds"] == [0, 1, 2, 3] and s["routing"] == "data" for s in summaries.values())


def test_the_learned_router_trains_over_grpc_as_in_process(tmp_path: Path) -> None:
    config = CONFIG.with_overrides({"routing.router": "learned", "rounds": 2, "inner.steps": 10})
    coordinator, _ = federation((1, 2, 0), tmp_path / "state", config)
    local = run_federation(SPEC, config, [LocalClient(SPEC.data(i, 3)) for i in (1, 2, 0)])
    assert coordinator.engine.assignments == local.engine.assignments
    assert sum(a.trains_router for a in coordinator.engine.assignments.values()) == 3  # one per client
    ours, theirs = coordinator.engine.router_model.tensors(), local.engine.router_model.tensors()
    assert all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in theirs)
    ours, theirs = coordinator.engine.model.module_states(), local.engine.model.module_states()
    assert all(torch.allclose(ours[k][n], t, atol=1e-4) for k, s in theirs.items() for n, t in s.items())


def test_a_coordinator_process_that_cannot_load_training_data_trains_by_the_clients_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raising_spec import NO_DATA

    with monkeypatch.context() as patch:
        patch.setenv(NO_DATA, "1")
        with pytest.raises(RuntimeError, match="must not load"):
            load_spec("raising_spec:spec").data(0, 3)
    paths = [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, NO_DATA: "1", "PYTHONPATH": os.pathsep.join(paths)}
    state, log = tmp_path / "state", tmp_path / "server.log"
    settings = ["--spec", "raising_spec:spec", "--routing", "data", "--grid", "3", "--rounds", "2"]
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedmoe.cli", "server", *settings, "--steps", "10", "--min-clients", "3"]
            + ["--address", "127.0.0.1:0", "--state", str(state), "--exit-when-done"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    try:
        port = next(int(m.group(1)) for line in server.stdout if (m := re.search(r"on port (\d+)", line)))
        summaries = {}

        def client(i: int) -> None:
            summaries[i] = run(
                f"127.0.0.1:{port}", "raising_spec:spec", partition=i, partitions=3, poll_s=0.02
            )

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        server.kill()
    text = log.read_text()
    assert "federated k-means converged" in text and "round 2 closed" in text
    assert re.search(r"round 2 closed: .*client_accuracy [\d.]+, client_accuracy_min", text)
    assert sorted(s["path"] for s in summaries.values()) == ["0", "1", "2"]
    from examples.tabular import TEST

    accuracy = Ensemble.load(state / "ensemble").score(TEST)["accuracy"]
    print(f"routed ensemble accuracy after 2 short rounds {accuracy:.4f}")
    assert accuracy > 0.5  # 4 classes
    last = json.loads((state / "ensemble" / "manifest.json").read_text())["metrics"][-1]
    assert last["client_accuracy_min"] <= last["client_accuracy"] <= last["client_accuracy_max"]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_bad_cluster_statistics_histograms_and_uploads_are_refused_and_change_nothing(tmp_path: Path) -> None:
    config = CONFIG.with_overrides({"rounds": 1, "inner.steps": 2, "policy.min_clients": 2})
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    channel = connect(f"127.0.0.1:{port}")
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        sessions = [
            join(stub, PROFILES["fp32"], f"client {i}", None, enrolment=given_enrolment()) for i in range(2)
        ]
        crews = [
            Crew(SPEC, coordinator.model, prepare_data(SPEC, SPEC.data(i, 3), None, 0, 1)) for i in range(2)
        ]
        a, crew = sessions[0], crews[0]

        def cluster(**fields) -> grpc.StatusCode:
            good = cluster_stats(crew.examples.features, None)
            report = {
                "pass_number": 0,
                "counts": good.counts.tolist(),
                "sums": good.sums.ravel().tolist(),
                "squares": good.squares.ravel().tolist(),
                **fields,
            }
            request = pb.ClusterReport(client_id=a.client_id, **report)
            return code_of(lambda: stub.Cluster(request, metadata=a.metadata, timeout=10))

        invalid = grpc.StatusCode.INVALID_ARGUMENT
        width = crew.examples.features.shape[1]
        assert cluster(counts=[1.0, 2.0]) == invalid  # two clusters in the one-cluster pass
        assert cluster(squares=[1.0] * (width - 1)) == invalid  # sums and squares of unlike shapes
        assert cluster(counts=[math.nan]) == invalid
        assert cluster(counts=[-5.0]) == invalid
        assert cluster(counts=[10.5]) == invalid  # not a whole number of examples
        assert cluster(squares=[-1.0] * width) == invalid
        assert cluster(soft=[1.0]) == invalid  # soft counts nobody asked for
        assert cluster(sums=[1e6] * width) == invalid  # sums no examples with these squares have
        assert cluster(pass_number=3) == grpc.StatusCode.FAILED_PRECONDITION
        assert not coordinator.answers and coordinator.passes == 0

        for session, c in zip(sessions, crews):
            c.answer(stub, session, RETRY)
        assert coordinator.passes == 1
        proposal = stub.Proposal(pb.ProposalRequest(client_id=a.client_id), metadata=a.metadata, timeout=10)
        features = crew.examples.features
        grown = cluster_stats(
            np.vstack([features, features[:1]]), *proposal_arrays(proposal), proposal.softness
        )
        more = {"counts": grown.counts.tolist(), "sums": grown.sums.ravel().tolist()}
        assert cluster(pass_number=1, squares=grown.squares.ravel().tolist(), **more) == invalid
        assert not coordinator.answers
        while not coordinator.engine.clustered:
            for session, c in zip(sessions, crews):
                c.answer(stub, session, RETRY)

        total = len(crew.local.train)
        for bad in (
            [1, 2],
            [-1, 2, total - 1],
            [0.5, 1, total - 1.5],
            [0, 0, 0],
            [math.nan, 1, 1],
            [total + 1, 0, 0],
        ):
            request = pb.AssignRequest(client_id=a.client_id, histogram=bad)
            assign = functools.partial(stub.Assign, request, metadata=a.metadata, timeout=10)
            assert code_of(assign) == invalid, bad
        assert not coordinator.held and not coordinator.engine.assignments

        assert not crew.assign(stub, a, RETRY)  # held until the other clustering member's histogram
        assert crews[1].assign(stub, sessions[1], RETRY) and crew.assign(stub, a, RETRY)
        worker_id, worker = next(iter(crew.workers.items()))
        upload = worker.train_round(pull_job(stub, a, RETRY, worker_id))
        examples = coordinator.engine.assignments[worker_id].examples
        assert upload.weight == examples and upload.evaluation["examples"] > 0
        before = {
            k: {n: t.clone() for n, t in s.items()}
            for k, s in coordinator.engine.model.module_states().items()
        }

        def push(upload, worker_id=worker_id, tamper=None) -> grpc.StatusCode:
            frames = list(push_frames(a, upload, None, worker_id))
            if tamper:
                tamper(frames[0].header)
            return code_of(lambda: stub.Push(iter(frames), metadata=a.metadata, timeout=30))

        assert push(replace(upload, weight=examples + 1.0)) == invalid
        assert push(replace(upload, weight=-1.0)) == invalid
        assert push(replace(upload, evaluation={**upload.evaluation, "accuracy": math.nan})) == invalid
        assert push(replace(upload, evaluation={**upload.evaluation, "examples": 0.5})) == invalid

        def better(header) -> None:  # changed after signing: the signature covers the evaluation
            header.evaluation["accuracy"] = 1.0

        assert push(upload, tamper=better) == grpc.StatusCode.UNAUTHENTICATED
        other = next(iter(crews[1].workers))
        assert push(upload, worker_id=other) == grpc.StatusCode.NOT_FOUND  # another client's worker
        now = coordinator.engine.model.module_states()
        assert not coordinator.pending and all(
            torch.equal(now[k][n], t) for k, s in before.items() for n, t in s.items()
        )
        frames = push_frames(a, upload, None, worker_id)
        assert stub.Push(frames, metadata=a.metadata, timeout=30).accepted
        assert list(coordinator.pending) == [worker_id]
        resumed = Coordinator(config, tmp_path / "state")  # the stored update keeps its evaluation
        assert resumed.pending[worker_id][0].evaluation == upload.evaluation
    finally:
        channel.close()
        server.stop(0).wait()


def test_a_restart_mid_clustering_starts_it_again_and_a_silent_member_is_left_out_at_the_deadline(
    tmp_path: Path,
) -> None:
    now = [0.0]
    config = CONFIG.with_overrides({"policy.min_clients": 2, "policy.deadline_s": 10})
    features = [SPEC.features(SPEC.data(i, 3).train) for i in range(3)]

    def coordinator() -> Coordinator:
        return Coordinator(config, tmp_path / "state", clock=lambda: now[0])

    def answer(c: Coordinator, client_id: str, f: np.ndarray) -> None:
        p = c.proposal(client_id)
        s = cluster_stats(f, p.centroids, p.prices, p.softness)
        c.cluster(client_id, p.number, s.counts, s.sums, s.squares, np.zeros(0) if s.soft is None else s.soft)

    first = coordinator()
    key = bytes(32)  # the coordinator keeps a member's key; nothing here is signed
    ids = [first.join(PROFILES["fp32"], f"m{i}", public_key=key, enrolled=True).client_id for i in range(2)]
    assert first.clustering == ids and first.action(ids[0]) == ("CLUSTER", [])
    for client_id, f in zip(ids, features):
        answer(first, client_id, f)
    answer(first, ids[0], features[0])
    assert first.passes == 1 and list(first.answers) == [ids[0]]

    restarted = coordinator()  # members are durable; clustering starts again
    assert restarted.clustering == ids and restarted.passes == 0 and restarted.engine.kmeans.iterations == 0
    late = restarted.join(PROFILES["int8"], "late", public_key=key, enrolled=True).client_id
    assert restarted.action(late) == ("WAIT", [])  # joined during clustering: waits for its end
    answer(restarted, ids[0], features[0])
    now[0] += 11  # ids[1] stays silent past the deadline
    assert restarted.action(ids[0]) == ("CLUSTER", []) and restarted.clustering == [ids[0]]
    assert restarted.action(ids[1]) == ("WAIT", [])
    while not restarted.engine.clustered:
        answer(restarted, ids[0], features[0])

    again = coordinator()  # converged clustering is durable, and so is whose histograms are awaited
    assert (
        again.engine.clustered and again.barrier == [ids[0]] and again.clustered == {ids[0]: len(features[0])}
    )
    centroids, prices = again.engine.routing_state()
    assert again.assign(late, histogram(features[2], centroids, prices)) == {}  # held
    assert again.action(late) == ("WAIT", []) and again.action(ids[0]) == ("ASSIGN", [])
    assert again.assign(ids[0], histogram(features[0], centroids, prices))
    assert next(iter(again.engine.assignments)).startswith(f"{ids[0]}.")  # join order, not arrival
    assert again.workers(late) and again.action(ids[1]) == ("ASSIGN", [])
    assert again.assign(ids[1], histogram(features[1], centroids, prices))  # assigned on arrival
    assert again.action(ids[1])[0] == "TRAIN"


def test_second_moments_are_taken_only_when_asked_and_only_of_the_right_size(tmp_path: Path) -> None:
    flow = "fedmoe.models.digits_flow:spec"
    config = Config(spec=flow, grid=(2,), rounds=1).with_overrides({"policy.min_clients": 1})
    coordinator = Coordinator(config, tmp_path / "state")
    member = coordinator.join(PROFILES["fp32"], "m", public_key=bytes(32), enrolled=True).client_id
    spec = load_spec(flow)
    features = spec.features(spec.data(0, 1).train)

    def answer(products: np.ndarray) -> None:
        p = coordinator.proposal(member)
        s = cluster_stats(features, p.centroids, p.prices, p.softness)
        soft = np.zeros(0) if s.soft is None else s.soft
        coordinator.cluster(member, p.number, s.counts, s.sums, s.squares, soft, products)

    with pytest.raises(Rejected, match="does not ask") as refused:  # the first pass asks for none
        answer(np.ones(3))
    assert refused.value.code == "INVALID_ARGUMENT"
    while not coordinator.proposal(member).products:
        answer(np.zeros(0))
    p = coordinator.proposal(member)
    right = upper_triangles(cluster_stats(features, p.centroids, p.prices, p.softness, True).products)
    for wrong in (np.zeros(0), right[:-1], np.append(right, 0.0), right * 1.5):
        with pytest.raises(Rejected) as refused:
            answer(wrong)
        assert refused.value.code == "INVALID_ARGUMENT"
    assert not coordinator.engine.clustered
    answer(right)
    assert coordinator.engine.clustered and coordinator.engine.kmeans.last.products is not None
