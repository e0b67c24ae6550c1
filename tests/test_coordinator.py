"""The coordinator over real gRPC on 127.0.0.1: big tensors, bad input, restarts,
and agreement with the in-process runner.
"""

import copy
import functools
import json
import struct
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedmoe.engine
import fedmoe.server.service
from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import (
    Session,
    StreamingStub,
    connect,
    join,
    pull_job,
    push_frames,
    run,
    variant_of,
)
from fedmoe.compress.quant import QTensor, quantize
from fedmoe.config import Config
from fedmoe.federation import run_federation
from fedmoe.models.classifier import mlp_levels
from fedmoe.modular import Path
from fedmoe.security import given_enrolment, new_signing_key, public_bytes, update_digest
from fedmoe.server.coordinator import Coordinator, Rejected
from fedmoe.server.service import start_server
from fedmoe.spec import Spec, load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.v1 import tensor_pb2
from fedmoe.worker import Upload, Worker, signed_fields

SPEC = load_spec("fedmoe.models.digits:spec")
# paths in turn, each client joining with its routing statistics (routing by data: tests/test_grpc_routing.py)
CONFIG = Config(
    grid=(2,), rounds=2, inner={"steps": 5}, policy={"min_clients": 2}, routing={"assign": "turn"}
)
DATA = SPEC.data(0, 2).train.subset(range(100))
FEATURES = SPEC.feature_statistics(DATA)
# 12.7M parameters: 51 MB at fp32
big_spec = Spec("big", mlp_levels(in_dim=64, hidden=2500, depth=3, classes=10))


@pytest.fixture
def federation(tmp_path):
    coordinator = Coordinator(CONFIG, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    channel = connect(f"127.0.0.1:{port}")
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        yield coordinator, stub
    finally:
        channel.close()
        server.stop(0).wait()


def joined(stub, profile="fp32"):
    session = join(stub, PROFILES[profile], profile, FEATURES, enrolment=given_enrolment())
    a = session.assignment
    path_model = copy.deepcopy(SPEC.build(CONFIG.grid, CONFIG.seed).compose(Path.parse(a.path)))
    return session, Worker(SPEC, path_model, DATA.batches(16, a.seed), len(DATA), variant_of(a.variant))


def trained_upload(stub, session, worker):
    return worker.train_round(pull_job(stub, session))


def push(stub, session, upload, update_id=None):
    return stub.Push(push_frames(session, upload, update_id), metadata=session.metadata, timeout=60)


def code_of(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def snapshot(coordinator):
    return {
        k: {n: t.clone() for n, t in s.items()} for k, s in coordinator.engine.model.module_states().items()
    }, dict(coordinator.pending)


def unchanged(coordinator, before):
    states, pending = before
    now = coordinator.engine.model.module_states()
    return pending.keys() == coordinator.pending.keys() and all(
        torch.equal(now[k][n], t) for k, s in states.items() for n, t in s.items()
    )


def test_bad_input_gets_a_precise_status_and_changes_nothing(federation):
    coordinator, stub = federation
    a, worker_a = joined(stub)
    b, _ = joined(stub, "int8")
    upload = trained_upload(stub, a, worker_a)
    before = snapshot(coordinator)
    forged = Session(
        a.client_id,
        a.token[:-2] + ("AA" if not a.token.endswith("AA") else "BB"),
        a.model,
        a.assignment,
        a.signing_key,
    )
    assert code_of(lambda: push(stub, forged, upload)) == grpc.StatusCode.UNAUTHENTICATED
    as_b = Session(a.client_id, b.token, a.model, a.assignment, a.signing_key)
    assert code_of(lambda: push(stub, as_b, upload)) == grpc.StatusCode.PERMISSION_DENIED
    assert (
        code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=a.client_id), timeout=10))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    stale = Upload(upload.path, upload.variant, 7, upload.seed, upload.weight, upload.tensors, upload.loss)
    assert code_of(lambda: push(stub, a, stale)) == grpc.StatusCode.FAILED_PRECONDITION
    name = next(iter(upload.tensors))
    wrong_shape = dict(upload.tensors, **{name: quantize(torch.zeros(3, 3), 32)})
    assert (
        code_of(
            lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, wrong_shape, 0.0))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    q = upload.tensors[name]
    nan = QTensor(32, q.shape, struct.pack("<f", float("nan")) * (len(q.payload) // 4), b"")
    assert (
        code_of(
            lambda: push(
                stub,
                a,
                Upload(
                    upload.path, upload.variant, 0, upload.seed, 1.0, dict(upload.tensors, **{name: nan}), 0.0
                ),
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    huge = QTensor(32, q.shape, struct.pack("<f", 1e30) * (len(q.payload) // 4), b"")
    assert (
        code_of(
            lambda: push(
                stub,
                a,
                Upload(
                    upload.path,
                    upload.variant,
                    0,
                    upload.seed,
                    1.0,
                    dict(upload.tensors, **{name: huge}),
                    0.0,
                ),
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    other_path = Upload(
        Path((1 - upload.path.modules[0],)), upload.variant, 0, upload.seed, 1.0, upload.tensors, 0.0
    )
    assert code_of(lambda: push(stub, a, other_path)) == grpc.StatusCode.INVALID_ARGUMENT

    def corrupted():
        frames = list(push_frames(a, upload))
        tensor_frames = [f.tensor for f in frames if f.WhichOneof("frame") == "tensor"]
        inner = [t for f in tensor_frames for t in (f.batch.frames if f.HasField("batch") else [f])]
        chunk = next(t for t in inner if t.WhichOneof("frame") == "chunk")
        chunk.chunk.data = bytes([chunk.chunk.data[0] ^ 1]) + chunk.chunk.data[1:]
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(corrupted) == grpc.StatusCode.INVALID_ARGUMENT

    def truncated():
        frames = list(push_frames(a, upload))
        last = frames[-1].tensor
        assert last.HasField("batch")  # this path's small tensors travel together in one message
        del last.batch.frames[-2:]  # its last chunk and End
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(truncated) == grpc.StatusCode.DATA_LOSS

    def resigned(key=None, weight=None):
        frames = list(
            push_frames(Session(a.client_id, a.token, a.model, a.assignment, key or a.signing_key), upload)
        )
        if weight is not None:
            frames[0].header.weight = weight  # changed after signing: a man in the middle, or a cheat
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(lambda: resigned(weight=upload.weight / 2)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: resigned(key=new_signing_key())) == grpc.StatusCode.UNAUTHENTICATED
    wrong_bits = dict(upload.tensors, **{name: quantize(torch.zeros(q.shape), 8)})
    assert (
        code_of(
            lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, wrong_bits, 0.0))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert unchanged(coordinator, before)
    update_id = uuid.uuid4().hex
    assert push(stub, a, upload, update_id).accepted
    assert code_of(lambda: push(stub, a, upload, update_id)) == grpc.StatusCode.ALREADY_EXISTS  # a replay
    # a second update for the round
    assert code_of(lambda: push(stub, a, upload)) == grpc.StatusCode.ALREADY_EXISTS
    assert len(coordinator.pending) == 1 and coordinator.round == 0


def test_a_join_without_good_routing_statistics_is_refused_and_admits_nobody(federation):
    coordinator, stub = federation
    feature_sum, count = FEATURES
    for bad in [(np.zeros(0), 0.0), (feature_sum, 0.0), (np.full_like(feature_sum, np.nan), count)]:
        assert (
            code_of(functools.partial(join, stub, PROFILES["fp32"], "bad", bad, enrolment=given_enrolment()))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    joined(stub)
    with pytest.raises(grpc.RpcError) as error:
        join(stub, PROFILES["fp32"], "narrow", (feature_sum[:10], count), enrolment=given_enrolment())
    assert (
        error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "routing features" in error.value.details()
    )
    assert list(coordinator.members) == ["c0000"] and list(coordinator.engine.assignments) == ["c0000"]


def test_a_config_that_cannot_run_over_the_network_or_another_federations_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compression.scheme=rolling"):
        Coordinator(CONFIG.with_overrides({"compression.scheme": "magnitude"}), tmp_path / "a")
    Coordinator(CONFIG, tmp_path / "b").save_state()
    with pytest.raises(ValueError, match="another federation .*grid"):
        Coordinator(CONFIG.with_overrides({"grid": "3"}), tmp_path / "b")


def test_uploads_are_checked_outside_the_lock_and_admitted_once(federation, monkeypatch):
    coordinator, stub = federation
    a, worker_a = joined(stub)
    joined(stub, "int8")  # a second member: a's update alone does not close the round
    upload = trained_upload(stub, a, worker_a)
    decoding, release = threading.Semaphore(0), threading.Event()
    real_decode = coordinator.engine.decode

    def held_decode(client_id, upload):
        decoding.release()
        assert release.wait(10)
        return real_decode(client_id, upload)

    monkeypatch.setattr(coordinator.engine, "decode", held_decode)
    outcomes = []

    def submit(update_id):
        signature = a.signing_key.sign(
            update_digest(signed_fields(a.client_id, update_id, upload), upload.tensors)
        )
        try:
            outcomes.append(coordinator.submit(upload, a.client_id, update_id, signature))
        except Rejected as e:
            outcomes.append(e.code)

    submitters = [threading.Thread(target=submit, args=(f"update-{i}",)) for i in range(2)]
    for t in submitters:
        t.start()
    assert decoding.acquire(timeout=10) and decoding.acquire(timeout=10), "both uploads are decoded at once"
    status = []
    reader = threading.Thread(target=lambda: status.append(coordinator.status()))
    reader.start()
    reader.join(5)
    release.set()
    for t in submitters:
        t.join(10)
    assert status and status[0]["pending"] == [], "status waited for the uploads being decoded"
    assert sorted(map(str, outcomes)) == ["0", "ALREADY_EXISTS"]  # one client, one update per round
    assert list(coordinator.pending) == [a.client_id]


def test_acknowledged_updates_survive_a_restart_and_are_applied_once(tmp_path):
    def federation_round(state, restart):
        coordinator = Coordinator(CONFIG, state)
        server, port = start_server(coordinator, "127.0.0.1:0")
        channel = connect(f"127.0.0.1:{port}")
        stub = pb_grpc.CoordinatorStub(channel)
        a, worker_a = joined(stub)
        b, worker_b = joined(stub, "int4-p50")
        upload_a = trained_upload(stub, a, worker_a)
        upload_b = trained_upload(stub, b, worker_b)
        assert push(stub, a, upload_a).accepted
        if restart:  # the coordinator dies after acknowledging a's update
            channel.close()
            server.stop(0).wait()
            coordinator = Coordinator(CONFIG, state)
            assert list(coordinator.pending) == [a.client_id]
            server, port = start_server(coordinator, "127.0.0.1:0")
            channel = connect(f"127.0.0.1:{port}")
            stub = pb_grpc.CoordinatorStub(channel)
        assert push(stub, b, upload_b).accepted  # b's token still works: the secret is in the state directory
        channel.close()
        server.stop(0).wait()
        assert coordinator.round == 1 and coordinator.metrics[0]["updates"] == 2
        return coordinator.engine.model.module_states()

    straight = federation_round(tmp_path / "a", restart=False)
    restarted = federation_round(tmp_path / "b", restart=True)
    assert all(torch.equal(straight[k][n], restarted[k][n]) for k in straight for n in straight[k])
    resumed = Coordinator(CONFIG, tmp_path / "b")
    assert (
        resumed.round == 1
        and not resumed.pending
        and resumed.engine.feature_counts == {"c0000": 100.0, "c0001": 100.0}
    )
    assert all(
        torch.equal(resumed.engine.model.module_states()[k][n], restarted[k][n])
        for k in straight
        for n in straight[k]
    )


def test_sdk_clients_over_grpc_train_the_same_weights_as_the_in_process_runner(tmp_path):
    config = CONFIG
    local = run_federation(SPEC, config)
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    summaries = {}

    def client(i):
        # the coordinator's spec, loaded by its name
        summaries[i] = run(f"127.0.0.1:{port}", partition=i, partitions=2)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for i, t in enumerate(threads):  # client i joins i-th, as the in-process runner enrols it
            t.start()
            deadline = time.monotonic() + 60
            while len(coordinator.members) <= i:
                assert time.monotonic() < deadline and t.is_alive()
                time.sleep(0.05)
        for t in threads:
            t.join(120)
    finally:
        server.stop(0).wait()
    assert [summaries[i]["rounds"] for i in range(2)] == [[0, 1], [0, 1]]
    assert coordinator.engine.assignments == local.engine.assignments
    grpc_states, local_states = coordinator.engine.model.module_states(), local.engine.model.module_states()
    for k, state in local_states.items():
        for n, t in state.items():
            assert torch.allclose(grpc_states[k][n], t, atol=1e-6), f"{k}/{n}"
    ensemble = tmp_path / "state" / "ensemble"
    assert json.loads((ensemble / "manifest.json").read_text())["metrics"] == coordinator.metrics
    assert [m["updates"] for m in coordinator.metrics] == [2, 2]
    assert coordinator.metrics[-1]["accuracy"] == pytest.approx(local.rounds[-1]["accuracy"], abs=1e-6)


def test_a_50_mb_expert_is_pulled_and_pushed_through_the_stream(tmp_path):
    spec = load_spec(f"{__name__}:big_spec")
    config = Config(grid=(1,), rounds=1, inner={"steps": 1, "batch_size": 8})
    coordinator = Coordinator(config, tmp_path / "state", spec=spec)
    size = 4 * sum(p.numel() for p in coordinator.engine.model.parameters())
    assert size > 50e6
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        summary = run(f"127.0.0.1:{port}", spec, "fp32", data=(DATA.inputs, DATA.targets), timeout_s=300)
    finally:
        server.stop(0).wait()
    assert summary["rounds"] == [0] and summary["upload_bytes"] == size
    assert coordinator.finished and coordinator.metrics[0]["upload_bytes"] == size


@pytest.mark.parametrize("late", ["drop", "stale"])
def test_a_straggler_update_is_dropped_or_counted_with_staleness_weight(tmp_path, late):
    config = Config(
        grid=(1,),
        rounds=3,
        inner={"steps": 3},
        policy={"quorum": 0.5, "late": late},
        routing={"assign": "turn"},
    )
    coordinator = Coordinator(config, tmp_path / "state")
    keys = [new_signing_key() for _ in range(2)]
    fast, slow = (
        coordinator.join(
            PROFILES["fp32"],
            name,
            public_key=public_bytes(key),
            feature_sum=FEATURES[0],
            examples=FEATURES[1],
            enrolled=True,
        )
        for name, key in zip(("fast", "slow"), keys)
    )

    def upload_of(member):
        job = coordinator.job(member.client_id)
        path_model = copy.deepcopy(SPEC.build(config.grid).compose(job.path))
        return Worker(SPEC, path_model, DATA.batches(8, job.seed), 50, job.variant).train_round(job)

    def submit(upload, member, update_id):
        key = keys[[fast, slow].index(member)]
        digest = update_digest(signed_fields(member.client_id, update_id, upload), upload.tensors)
        return coordinator.submit(upload, member.client_id, update_id, key.sign(digest))

    late_upload = upload_of(slow)  # pulled round 0 ...
    # ... which closes without it (quorum 1 of 2)
    assert submit(upload_of(fast), fast, "u1") == 1
    if late == "drop":
        with pytest.raises(Rejected) as rejected:
            submit(late_upload, slow, "u2")
        assert rejected.value.code == "FAILED_PRECONDITION" and not coordinator.pending
    else:
        # counted in round 1, which it closes
        assert submit(late_upload, slow, "u2") == 2
        assert coordinator.metrics[1]["updates"] == 1


def test_an_oversize_update_is_refused_before_its_data_is_read(tmp_path):
    coordinator = Coordinator(CONFIG.with_overrides({"transport.max_update_bytes": 1000}), tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            a, worker = joined(stub)
            upload = trained_upload(stub, a, worker)
            assert upload.nbytes > 1000
            assert code_of(lambda: push(stub, a, upload)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not coordinator.pending
    finally:
        server.stop(0).wait()


FUZZ_SESSIONS: dict = {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6), st.booleans())
def test_random_push_streams_never_crash_the_server(federation, blobs, with_header):
    coordinator, stub = federation
    session = FUZZ_SESSIONS.get(id(coordinator)) or FUZZ_SESSIONS.setdefault(id(coordinator), joined(stub)[0])
    frames = []
    if with_header:
        frames.append(
            pb.PushFrame(
                header=pb.PushHeader(
                    client_id=session.client_id, round=0, path="0", update_id=uuid.uuid4().hex
                )
            )
        )
    for blob in blobs:
        try:
            frames.append(pb.PushFrame.FromString(blob))
        except DecodeError:
            frames.append(pb.PushFrame(tensor=tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=blob))))
    before = snapshot(coordinator)
    with pytest.raises(grpc.RpcError) as error:
        stub.Push(iter(frames), metadata=session.metadata, timeout=30)
    assert error.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert unchanged(coordinator, before)
    assert json.loads(stub.Status(pb.StatusRequest(), timeout=10).json)["round"] == 0  # still serving


def test_a_delivery_is_made_and_encoded_once_per_round_for_every_worker_that_receives_it(
    tmp_path, monkeypatch
):
    made, encoded = [], []
    real_make, real_encode = fedmoe.engine.make_job, fedmoe.server.service.encode_tensors
    monkeypatch.setattr(fedmoe.engine, "make_job", lambda *a: made.append(1) or real_make(*a))
    monkeypatch.setattr(
        fedmoe.server.service, "encode_tensors", lambda t, **kw: encoded.append(1) or real_encode(t, **kw)
    )
    coordinator = Coordinator(CONFIG.with_overrides({"grid": "1"}), tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            (a, worker_a), (b, worker_b) = joined(stub), joined(stub)
            # the last through the client's own stub, which reads chunks as views of the messages
            pulls = ((stub, a, worker_a), (stub, b, worker_b), (StreamingStub(channel), a, worker_a))
            jobs = [pull_job(via, s) for via, s, _ in pulls]
            assert made == [1] and encoded == [1]  # one path and variant: made and encoded once
            assert jobs[0].seed != jobs[1].seed  # each worker still gets its own seed
            assert all(
                jobs[0].tensors[n].payload == j.tensors[n].payload for j in jobs for n in jobs[0].tensors
            )
            for session, worker, job in ((a, worker_a, jobs[0]), (b, worker_b, jobs[1])):
                assert push(stub, session, worker.train_round(job)).accepted
            assert coordinator.round == 1
            pull_job(stub, a)
            assert made == [1, 1] and encoded == [1, 1]  # a new round, a new delivery
    finally:
        server.stop(0).wait()
