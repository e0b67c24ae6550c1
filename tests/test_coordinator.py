"""The coordinator over real gRPC on 127.0.0.1: big tensors, bad input, restarts."""

import json
import struct
import threading
import uuid

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.clients.runtime import Session, connect, join, push_frames, run, train_round
from fedmoe.compress.quant import QTensor, quantize
from fedmoe.modular import Path
from fedmoe.server import coordinator as coordinator_module
from fedmoe.server.coordinator import Coordinator, CoordinatorConfig, Rejected
from fedmoe.server.service import start_server
from fedmoe.assignment import PROFILES
from fedmoe.tasks import digits_task
from fedmoe.train import InnerConfig
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.v1 import tensor_pb2
from fedmoe.security import new_signing_key, update_digest
from fedmoe.worker import Upload, Variant, Worker, round_masks, signed_fields

CONFIG = CoordinatorConfig(grid=(2,), rounds=2, inner=InnerConfig(steps=5), min_clients=2)


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
    session = join(stub, PROFILES[profile], profile, None, deadline=float("inf"))
    a = session.assignment
    task = digits_task()
    worker = Worker(Path.parse(a.path), task.batches(range(100), 16, a.seed), 100.0, Variant(a.variant.bits, a.variant.density, a.variant.scheme), a.seed)
    return session, worker


def trained_upload(coordinator, stub, session, worker):
    return train_round(stub, session, worker, coordinator.spec, None, float("inf"))


def push(stub, session, upload, update_id=None):
    return stub.Push(push_frames(session, upload, update_id), metadata=session.metadata, timeout=60)


def code_of(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def snapshot(coordinator):
    return {k: {n: t.clone() for n, t in s.items()} for k, s in coordinator.model.module_states().items()}, dict(coordinator.pending)


def unchanged(coordinator, before):
    states, pending = before
    now = coordinator.model.module_states()
    return pending.keys() == coordinator.pending.keys() and all(torch.equal(now[k][n], t) for k, s in states.items() for n, t in s.items())


def test_bad_input_gets_a_precise_status_and_changes_nothing(federation):
    coordinator, stub = federation
    a, worker_a = joined(stub)
    b, _ = joined(stub, "int8")
    upload = trained_upload(coordinator, stub, a, worker_a)
    before = snapshot(coordinator)
    forged = Session(a.client_id, a.token[:-2] + ("AA" if not a.token.endswith("AA") else "BB"), a.model, a.assignment, a.signing_key)
    assert code_of(lambda: push(stub, forged, upload)) == grpc.StatusCode.UNAUTHENTICATED
    as_b = Session(a.client_id, b.token, a.model, a.assignment, a.signing_key)
    assert code_of(lambda: push(stub, as_b, upload)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=a.client_id), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    stale = Upload(upload.path, upload.variant, 7, upload.seed, upload.weight, upload.tensors, upload.loss)
    assert code_of(lambda: push(stub, a, stale)) == grpc.StatusCode.FAILED_PRECONDITION
    name = next(iter(upload.tensors))
    wrong_shape = dict(upload.tensors, **{name: quantize(torch.zeros(3, 3), 32)})
    assert code_of(lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, wrong_shape, 0.0))) == grpc.StatusCode.INVALID_ARGUMENT
    q = upload.tensors[name]
    nan = QTensor(32, q.shape, struct.pack("<f", float("nan")) * (len(q.payload) // 4), b"")
    assert code_of(lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, dict(upload.tensors, **{name: nan}), 0.0))) == grpc.StatusCode.INVALID_ARGUMENT
    huge = QTensor(32, q.shape, struct.pack("<f", 1e30) * (len(q.payload) // 4), b"")
    assert code_of(lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, dict(upload.tensors, **{name: huge}), 0.0))) == grpc.StatusCode.INVALID_ARGUMENT
    other_path = Upload(Path((1 - upload.path.modules[0],)), upload.variant, 0, upload.seed, 1.0, upload.tensors, 0.0)
    assert code_of(lambda: push(stub, a, other_path)) == grpc.StatusCode.INVALID_ARGUMENT

    def corrupted():
        frames = list(push_frames(a, upload))
        chunk = next(f for f in frames if f.WhichOneof("frame") == "tensor" and f.tensor.WhichOneof("frame") == "chunk")
        chunk.tensor.chunk.data = bytes([chunk.tensor.chunk.data[0] ^ 1]) + chunk.tensor.chunk.data[1:]
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(corrupted) == grpc.StatusCode.INVALID_ARGUMENT

    def truncated():
        frames = list(push_frames(a, upload))[:-2]
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(truncated) == grpc.StatusCode.DATA_LOSS

    def resigned(key=None, weight=None):
        frames = list(push_frames(Session(a.client_id, a.token, a.model, a.assignment, key or a.signing_key), upload))
        if weight is not None:
            frames[0].header.weight = weight  # changed after signing: a man in the middle, or a cheat
        return stub.Push(iter(frames), metadata=a.metadata, timeout=60)

    assert code_of(lambda: resigned(weight=1e6)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: resigned(key=new_signing_key())) == grpc.StatusCode.UNAUTHENTICATED
    wrong_bits = dict(upload.tensors, **{name: quantize(torch.zeros(q.shape), 8)})
    assert code_of(lambda: push(stub, a, Upload(upload.path, upload.variant, 0, upload.seed, 1.0, wrong_bits, 0.0))) == grpc.StatusCode.INVALID_ARGUMENT
    assert unchanged(coordinator, before)
    update_id = uuid.uuid4().hex
    assert push(stub, a, upload, update_id).accepted
    assert code_of(lambda: push(stub, a, upload, update_id)) == grpc.StatusCode.ALREADY_EXISTS  # a replay
    assert code_of(lambda: push(stub, a, upload)) == grpc.StatusCode.ALREADY_EXISTS  # a second update for the round
    assert len(coordinator.pending) == 1 and coordinator.round == 0


def test_uploads_are_checked_outside_the_lock_and_admitted_once(federation, monkeypatch):
    coordinator, stub = federation
    a, worker_a = joined(stub)
    joined(stub, "int8")  # a second member: a's update alone does not close the round
    upload = trained_upload(coordinator, stub, a, worker_a)
    decoding, release = threading.Semaphore(0), threading.Event()
    real_decode = coordinator_module.decode

    def held_decode(model, upload):
        decoding.release()
        assert release.wait(10)
        return real_decode(model, upload)

    monkeypatch.setattr(coordinator_module, "decode", held_decode)
    outcomes = []

    def submit(update_id):
        signature = a.signing_key.sign(update_digest(signed_fields(a.client_id, update_id, upload), upload.tensors))
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
        upload_a = trained_upload(coordinator, stub, a, worker_a)
        upload_b = trained_upload(coordinator, stub, b, worker_b)
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
        return coordinator.model.module_states()

    straight = federation_round(tmp_path / "a", restart=False)
    restarted = federation_round(tmp_path / "b", restart=True)
    assert all(torch.equal(straight[k][n], restarted[k][n]) for k in straight for n in straight[k])
    resumed = Coordinator(CONFIG, tmp_path / "b")
    assert resumed.round == 1 and not resumed.pending
    assert all(torch.equal(resumed.model.module_states()[k][n], restarted[k][n]) for k in straight for n in straight[k])


def test_a_50_mb_expert_is_pulled_and_pushed_through_the_stream(tmp_path):
    task = digits_task(hidden=2500, depth=3)  # 12.7M parameters: 51 MB at fp32
    config = CoordinatorConfig(grid=(1,), rounds=1, inner=InnerConfig(steps=1, batch_size=8))
    coordinator = Coordinator(config, tmp_path / "state", task=task)
    size = 4 * sum(p.numel() for p in coordinator.model.parameters())
    assert size > 50e6
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        summary = run(f"127.0.0.1:{port}", "fp32", timeout_s=300)
    finally:
        server.stop(0).wait()
    assert summary["rounds"] == [0] and summary["upload_bytes"] == size
    assert coordinator.finished and coordinator.metrics[0]["upload_bytes"] == size


@pytest.mark.parametrize("late", ["drop", "stale"])
def test_a_straggler_update_is_dropped_or_counted_with_staleness_weight(tmp_path, late):
    config = CoordinatorConfig(grid=(1,), rounds=3, inner=InnerConfig(steps=3), quorum=0.5, late=late)
    coordinator = Coordinator(config, tmp_path / "state")
    fast, slow = (coordinator.join(PROFILES["fp32"], name) for name in ("fast", "slow"))
    task = digits_task()

    def upload_of(member):
        worker = Worker(Path.parse(member.path), task.batches(range(50), 8, member.seed), 50.0, Variant(**member.variant), member.seed)
        _, round, delivered = coordinator.assignment(member.client_id)
        path_model = coordinator.spec.build().compose(worker.path)
        return worker.train_round(path_model, delivered, round_masks(path_model, worker.variant, round, member.seed), config.inner, round)

    late_upload = upload_of(slow)  # pulled round 0 ...
    assert coordinator.submit(upload_of(fast), fast.client_id, "u1") == 1  # ... which closes without it (quorum 1 of 2)
    if late == "drop":
        with pytest.raises(Exception) as rejected:
            coordinator.submit(late_upload, slow.client_id, "u2")
        assert rejected.value.code == "FAILED_PRECONDITION" and not coordinator.pending
    else:
        assert coordinator.submit(late_upload, slow.client_id, "u2") == 2  # counted in round 1, which it closes
        assert coordinator.metrics[1]["updates"] == 1


def test_an_oversize_update_is_refused_before_its_data_is_read(tmp_path):
    coordinator = Coordinator(CONFIG, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0", max_update_bytes=1000)
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            a, worker = joined(stub)
            upload = trained_upload(coordinator, stub, a, worker)
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
        frames.append(pb.PushFrame(header=pb.PushHeader(client_id=session.client_id, round=0, path="0", update_id=uuid.uuid4().hex)))
    for blob in blobs:
        try:
            frames.append(pb.PushFrame.FromString(blob))
        except DecodeError:
            frames.append(pb.PushFrame(tensor=tensor_pb2.TensorFrame(chunk=tensor_pb2.Chunk(data=blob))))
    before = snapshot(coordinator)
    with pytest.raises(grpc.RpcError) as error:
        stub.Push(iter(frames), metadata=session.metadata, timeout=30)
    assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
    assert unchanged(coordinator, before)
    assert json.loads(stub.Status(pb.StatusRequest(), timeout=10).json)["round"] == 0  # still serving
