"""Hostile input and faults against the coordinator over real gRPC on 127.0.0.1: every finding of the
hardening review stays closed (the numbers are the review's items)."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path as FsPath

import grpc
import numpy as np
import pytest
import torch

from fedmoe import checkpoint
from fedmoe.assignment import PROFILES, DeviceProfile
from fedmoe.checkpoint import load_checkpoint
from fedmoe.clients.runtime import (
    Session,
    StreamingStub,
    connect,
    join,
    profile_message,
    pull_job,
    push,
    push_frames,
    run,
    variant_of,
)
from fedmoe.clustering import cluster_stats
from fedmoe.compress.quant import quantize
from fedmoe.config import Config
from fedmoe.modular import Path
from fedmoe.security import (
    ENROLMENT_ENV,
    enrolment_token,
    given_enrolment,
    make_certs,
    new_signing_key,
    public_bytes,
    rejoin_message,
    update_digest,
)
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.service import start_server
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.v1 import tensor_pb2
from fedmoe.wire import TensorReader
from fedmoe.worker import Upload, Worker, signed_fields

SPEC = load_spec("fedmoe.models.digits:spec")
CONFIG = Config(
    grid=(2,),
    rounds=2,
    inner={"steps": 3},
    policy={"min_clients": 2},
    routing={"assign": "turn"},
    transport={"threads": 8, "max_streams": 4, "stream_idle_s": 1.5},
)
DATA = SPEC.data(0, 2).train.subset(range(100))
FEATURES = SPEC.feature_statistics(DATA)


class Federation:
    """A coordinator served on 127.0.0.1 and a channel to it."""

    def __init__(self, state: FsPath, config: Config = CONFIG):
        self.state, self.config = state, config
        self.coordinator = Coordinator(config, state)
        self.server, self.port = start_server(self.coordinator, "127.0.0.1:0")
        self.channel = connect(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()

    def joined(self, profile: str = "fp32") -> tuple[Session, Worker]:
        session = join(self.stub, PROFILES[profile], profile, FEATURES, enrolment=given_enrolment())
        a = session.assignment
        path_model = copy.deepcopy(SPEC.build(CONFIG.grid, CONFIG.seed).compose(Path.parse(a.path)))
        worker = Worker(SPEC, path_model, DATA.batches(16, a.seed), len(DATA), variant_of(a.variant))
        return session, worker

    def trained(self, session: Session, worker: Worker) -> Upload:
        return worker.train_round(pull_job(self.stub, session))

    def push(self, session: Session, upload: Upload, update_id: str | None = None) -> pb.PushReply:
        return self.stub.Push(push_frames(session, upload, update_id), metadata=session.metadata, timeout=30)

    def heartbeat(self, session: Session, timeout: float = 10) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(client_id=session.client_id)
        return self.stub.Heartbeat(request, metadata=session.metadata, timeout=timeout)

    def status(self, timeout: float = 10) -> dict:
        return json.loads(self.stub.Status(pb.StatusRequest(), timeout=timeout).json)


@pytest.fixture
def federation(tmp_path):
    f = Federation(tmp_path / "state")
    try:
        yield f
    finally:
        f.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def join_request(**fields) -> pb.JoinRequest:
    request = pb.JoinRequest(
        profile=profile_message(PROFILES["fp32"]),
        name="x",
        public_key=public_bytes(new_signing_key()),
        feature_sum=FEATURES[0].tolist(),
        examples=FEATURES[1],
        enrolment=given_enrolment(),
    )
    for name, value in fields.items():
        if name == "profile":
            request.profile.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def rss_bytes() -> int:
    for line in FsPath("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# 1 ----------------------------------------------------------------------------------------------
def test_1_an_update_weight_must_be_finite_positive_and_at_most_the_examples_reported(federation):
    a, worker_a = federation.joined()
    b, worker_b = federation.joined("int8")
    upload = federation.trained(a, worker_a)
    for weight in (0.0, -5.0, float("inf"), float("nan"), 1e39, FEATURES[1] + 1):
        bad = Upload(upload.path, upload.variant, 0, upload.seed, weight, upload.tensors, upload.loss)
        assert code_of(lambda bad=bad: federation.push(a, bad)) == grpc.StatusCode.INVALID_ARGUMENT, weight
    assert not federation.coordinator.pending
    assert federation.push(a, upload).accepted
    assert federation.push(b, federation.trained(b, worker_b)).round == 1  # the round closes as usual
    assert federation.heartbeat(a).action == pb.HeartbeatReply.TRAIN
    states = federation.coordinator.engine.model.module_states()
    assert all(torch.isfinite(t).all() for s in states.values() for t in s.values())


def test_1_a_push_is_written_to_disk_as_it_arrives_and_one_refused_or_cut_short_leaves_nothing(
    federation, monkeypatch
):
    monkeypatch.setattr(checkpoint, "GATHER_BYTES", 1)  # this model's tensors are small: write each at once
    a, worker_a = federation.joined()
    federation.joined("int8")  # the round stays open
    upload = federation.trained(a, worker_a)
    pending = federation.state / "pending"

    def spools():
        return list(pending.glob(".tmp-*")) if pending.exists() else []

    huge = {name: quantize(torch.full(q.shape, 1e6), q.bits) for name, q in upload.tensors.items()}
    too_far = Upload(upload.path, upload.variant, 0, upload.seed, upload.weight, huge, upload.loss)
    with pytest.raises(grpc.RpcError, match="outer gradient norm"):  # refused once read in full
        federation.push(a, too_far)
    assert not spools()
    frames = list(push_frames(a, upload))
    assert frames[-1].tensor.batch.frames[-1].WhichOneof("frame") == "end"
    with pytest.raises(grpc.RpcError, match="stream ended before End"):  # half-closed without its last frame
        federation.stub.Push(iter(frames[:-1]), metadata=a.metadata, timeout=30)
    assert not spools() and not federation.coordinator.pending
    spooled = []

    def pausing():  # the push's first tensors, then a pause until they are on disk, then the rest
        yield from frames[:2]
        deadline = time.monotonic() + 10
        while not spooled and time.monotonic() < deadline:
            spooled.extend(f.stat().st_size for f in spools() if f.stat().st_size)
            time.sleep(0.01)
        yield from frames[2:]

    assert federation.stub.Push(pausing(), metadata=a.metadata, timeout=30).accepted
    assert spooled, "the tensors received were not on disk while the push went on"
    assert not spools()  # the spool became the stored update
    (stored,) = pending.iterdir()
    _, _, _, _, read_back = federation.coordinator.read_pending(stored)
    assert {n: (bytes(q.payload), bytes(q.scales)) for n, q in read_back.tensors.items()} == {
        n: (bytes(q.payload), bytes(q.scales)) for n, q in upload.tensors.items()
    }
    (pending / ".tmp-left-by-a-crash").write_bytes(b"half a push")
    Coordinator(CONFIG, federation.state)  # a coordinator starting on this state
    assert list(pending.iterdir()) == [stored]


def test_1_a_large_push_is_read_off_the_event_loop_and_stored_byte_for_byte(tmp_path, monkeypatch):
    wide = load_spec("fedmoe.models.digits:wide")  # 2048-unit layers: 4 MB tensors at 8 bits
    config = Config(
        spec="fedmoe.models.digits:wide",
        grid=(1,),
        rounds=1,
        inner={"steps": 1},
        policy={"min_clients": 2},
        routing={"assign": "turn"},
    )
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    readers = set()
    real_feed = TensorReader.feed

    def feed(reader, frame):
        readers.add(threading.current_thread().name)
        return real_feed(reader, frame)

    monkeypatch.setattr(TensorReader, "feed", feed)
    features = wide.feature_statistics(DATA)
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            stub = StreamingStub(channel)
            a = join(stub, PROFILES["int8"], "a", features, enrolment=given_enrolment())
            join(stub, PROFILES["int8"], "b", features, enrolment=given_enrolment())  # the round stays open
            job = pull_job(stub, a)
            tensors = {n: quantize(torch.randn(q.shape) * 1e-3, q.bits) for n, q in job.tensors.items()}
            assert max(q.nbytes for q in tensors.values()) > 4 << 20
            upload = Upload(job.path, job.variant, job.round, job.seed, 1.0, tensors, 0.0)
            assert push(stub, a, upload, "").accepted
    finally:
        server.stop(0).wait()
    assert any(name.startswith("fedmoe-push") for name in readers), readers  # its chunks, off the loop
    (stored,) = (tmp_path / "state" / "pending").iterdir()
    read_back = coordinator.read_pending(stored)[4]
    assert {n: (bytes(q.payload), bytes(q.scales)) for n, q in read_back.tensors.items()} == {
        n: (bytes(q.payload), bytes(q.scales)) for n, q in tensors.items()
    }


def test_1_a_push_the_coordinator_has_no_disk_for_is_answered_unavailable_and_sent_again(
    federation, monkeypatch
):
    a, worker_a = federation.joined()
    federation.joined("int8")  # the round stays open
    upload = federation.trained(a, worker_a)

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.Spool, "write", full)
    frames = list(push_frames(a, upload))
    with pytest.raises(grpc.RpcError) as refused:
        federation.stub.Push(iter(frames), metadata=a.metadata, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot store updates now: No space left on device" in refused.value.details()
    assert not federation.coordinator.pending and not list((federation.state / "pending").glob(".tmp-*"))
    monkeypatch.undo()  # space again: the same update, sent again, is stored
    assert federation.stub.Push(iter(frames), metadata=a.metadata, timeout=30).accepted


# 2 ----------------------------------------------------------------------------------------------
def test_2_stalled_push_streams_are_bounded_and_never_block_heartbeats_or_status(federation):
    a, _ = federation.joined()
    b, _ = federation.joined("int8")
    c, worker_c = federation.joined()
    release = threading.Event()

    def silent():
        release.wait(30)
        yield from ()

    anonymous = [federation.stub.Push.future(silent(), timeout=30) for _ in range(16)]
    stalled = [federation.stub.Push.future(silent(), metadata=s.metadata, timeout=30) for s in (a, b) * 8]
    try:
        for call in anonymous:  # refused from the metadata, before any message is read
            assert call.exception(timeout=5).code() == grpc.StatusCode.UNAUTHENTICATED
        # two streams per client are held; the others are answered UNAVAILABLE at once
        deadline = time.monotonic() + 5
        while sum(c.done() for c in stalled) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        refused = [c for c in stalled if c.done()]
        assert len(refused) == 12 and {c.exception().code() for c in refused} == {grpc.StatusCode.UNAVAILABLE}
        for _ in range(10):
            started = time.monotonic()
            federation.status(timeout=2)
            federation.heartbeat(a, timeout=2)
            assert time.monotonic() - started < 1.0
        time.sleep(0.3)  # streams that moved nothing hold no place: c's pull and push take theirs at once
        started = time.monotonic()
        assert federation.trained(c, worker_c).round == 0 and time.monotonic() - started < 1.0
        held = [s for s in stalled if s not in refused]
        for call in held:  # ended: for c's pull, or after transport.stream_idle_s without a message
            ended = call.exception(timeout=10)
            assert ended.code() == grpc.StatusCode.CANCELLED
            assert "silent for" in ended.details() or "no message for" in ended.details()  # and told why
    finally:
        release.set()
    assert not federation.coordinator.pending and federation.status()["round"] == 0


# 3 ----------------------------------------------------------------------------------------------
def test_3_profiles_are_validated_quickly_without_the_lock(federation):
    memory, many = PROFILES["fp32"].memory_bytes, pb.DeviceProfile(name="x", memory_bytes=1, bits=32)
    many.densities.extend([0.5] * 100_000)
    bad_profiles = [
        many,
        pb.DeviceProfile(name="x", memory_bytes=0, bits=32, densities=[1.0]),
        pb.DeviceProfile(name="x", memory_bytes=memory, bits=3, densities=[1.0]),
        pb.DeviceProfile(name="x", memory_bytes=memory, bits=32, densities=[0.0]),
        pb.DeviceProfile(name="x", memory_bytes=memory, bits=32, densities=[1.5]),
        pb.DeviceProfile(name="x", memory_bytes=memory, bits=32, densities=[float("nan")]),
        pb.DeviceProfile(name="x", memory_bytes=memory, bits=32, densities=[1.0], speed=float("inf")),
    ]
    for profile in bad_profiles:
        started = time.monotonic()
        assert code_of(lambda p=profile: federation.stub.Join(join_request(profile=p), timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert time.monotonic() - started < 1.0
    assert not federation.coordinator.members


# 4 ----------------------------------------------------------------------------------------------
def test_4_a_tensor_header_is_checked_against_the_expected_upload_before_anything_is_allocated(federation):
    a, worker_a = federation.joined()
    federation.joined("int8")
    upload = federation.trained(a, worker_a)
    name = next(iter(upload.tensors))
    before = rss_bytes()

    def claiming(shape, tensor_name=name, round=0):
        frames = list(push_frames(a, upload))
        frames[0].header.round = round
        header = tensor_pb2.TensorHeader(
            name=tensor_name, bits=32, shape=shape, payload_bytes=4 * int(np.prod(shape)), digest=bytes(32)
        )
        huge = [
            pb.PushFrame(header=frames[0].header),
            pb.PushFrame(tensor=tensor_pb2.TensorFrame(header=header)),
        ]
        return federation.stub.Push(iter(huge), metadata=a.metadata, timeout=30)

    assert code_of(lambda: claiming([1 << 15, 1 << 15])) == grpc.StatusCode.INVALID_ARGUMENT  # 4 GiB
    assert code_of(lambda: claiming([1 << 28], "not.a.parameter")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: claiming([1 << 15, 1 << 15], round=5)) == grpc.StatusCode.FAILED_PRECONDITION
    assert rss_bytes() - before < 200 << 20
    assert federation.push(a, upload).accepted


# 5 and 7 ----------------------------------------------------------------------------------------
def test_5_7_client_text_is_bounded_escaped_and_never_forges_log_lines(federation, caplog):
    stub = federation.stub
    huge_key = join_request(public_key=b"k" * (4 << 20))
    assert code_of(lambda: stub.Join(huge_key, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    forged = "laptop\n2026-01-01 INFO fedmoe.server: round 9 closed\x1b[2J" + "x" * (1 << 20)
    with caplog.at_level(logging.INFO, logger="fedmoe"):
        reply = stub.Join(join_request(name=forged), timeout=10)
        metadata = (("authorization", f"Bearer {reply.token}"),)
        huge_id = "c" * (1 << 20)
        heartbeat = pb.HeartbeatRequest(client_id=huge_id)
        with pytest.raises(grpc.RpcError) as error:
            stub.Heartbeat(heartbeat, metadata=metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and len(error.value.details()) < 600
    name = federation.coordinator.members[reply.client_id].name
    assert "\n" not in name and "\x1b" not in name and len(name) <= 70 and name.startswith("laptop\\n")
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and "\x1b" not in text and len(text) < 2000
    assert len(json.dumps(federation.status())) < 20_000


# 6 ----------------------------------------------------------------------------------------------
def test_6_joining_needs_the_enrolment_token_and_the_federation_has_a_size(tmp_path, monkeypatch):
    monkeypatch.delenv(ENROLMENT_ENV)
    config = CONFIG.with_overrides({"membership.max_members": 2})
    f = Federation(tmp_path / "state", config)
    try:
        token = (tmp_path / "state" / "enrolment.token").read_text().strip()
        assert token == enrolment_token(tmp_path / "state") and len(token) >= 32
        assert (tmp_path / "state" / "enrolment.token").stat().st_mode & 0o777 == 0o600
        for enrolment in ("", "wrong-" + token[6:]):
            assert code_of(lambda e=enrolment: f.stub.Join(join_request(enrolment=e), timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        for _ in range(2):
            f.stub.Join(join_request(enrolment=token), timeout=10)
        assert code_of(lambda: f.stub.Join(join_request(enrolment=token), timeout=10)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert len(f.coordinator.members) == 2
    finally:
        f.close()


def test_6_silent_members_leave_the_quorum_and_a_member_can_leave(tmp_path):
    f = Federation(tmp_path / "state", CONFIG.with_overrides({"membership.evict_after_s": 1.0}))
    try:
        a, worker_a = f.joined()
        b, _ = f.joined("int8")
        c, _ = f.joined("fp32")
        f.stub.Leave(pb.LeaveRequest(client_id=c.client_id), metadata=c.metadata, timeout=10)
        assert code_of(lambda: f.heartbeat(c)) == grpc.StatusCode.UNAUTHENTICATED  # its tokens are revoked
        upload = f.trained(a, worker_a)
        time.sleep(1.2)  # b stays silent past membership.evict_after_s
        assert f.push(a, upload).round == 1  # the round closes on a alone: b and c do not count
        assert f.coordinator.metrics[0]["updates"] == 1
        assert f.heartbeat(b).action == pb.HeartbeatReply.TRAIN  # b is back as soon as it calls
    finally:
        f.close()


# 8 ----------------------------------------------------------------------------------------------
def test_8_the_signing_key_is_pinned_signatures_are_required_and_old_tokens_are_revoked(federation):
    a, worker_a = federation.joined()
    federation.joined("int8")
    upload = federation.trained(a, worker_a)
    stub = federation.stub
    new_key = new_signing_key()
    rejoin = join_request(client_id=a.client_id, public_key=public_bytes(new_key), enrolment="")
    assert (
        code_of(lambda: stub.Join(rejoin, metadata=a.metadata, timeout=10))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    thief = Session(a.client_id, a.token, a.model, a.assignment, new_key)
    assert code_of(lambda: federation.push(thief, upload)) == grpc.StatusCode.UNAUTHENTICATED

    def unsigned():
        frames = list(push_frames(a, upload))
        frames[0].header.signature = b""
        return stub.Push(iter(frames), metadata=a.metadata, timeout=30)

    assert code_of(unsigned) == grpc.StatusCode.UNAUTHENTICATED
    keyless = join_request(public_key=b"")
    assert code_of(lambda: stub.Join(keyless, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    same_key = join_request(client_id=a.client_id, public_key=public_bytes(a.signing_key), enrolment="")
    again = stub.Join(same_key, metadata=a.metadata, timeout=10)  # the same key needs no enrolment
    assert code_of(lambda: federation.heartbeat(a)) == grpc.StatusCode.UNAUTHENTICATED  # the old token
    renewed = Session(a.client_id, again.token, a.model, a.assignment, a.signing_key)
    assert federation.heartbeat(renewed).action in (pb.HeartbeatReply.TRAIN, pb.HeartbeatReply.WAIT)
    enrolled = join_request(client_id=a.client_id, public_key=public_bytes(new_key))
    moved = stub.Join(enrolled, metadata=renewed.metadata, timeout=10)  # a new key with the enrolment token
    rekeyed = Session(a.client_id, moved.token, a.model, a.assignment, new_key)
    assert federation.push(rekeyed, upload).accepted


# 9 ----------------------------------------------------------------------------------------------
def test_9_messages_that_do_not_parse_are_invalid_arguments_without_tracebacks(federation, caplog):
    a, _ = federation.joined()
    garbage = b"\xff\xff\xff\xff\x0f\x08"
    with caplog.at_level(logging.DEBUG):
        for method, metadata in (("Join", ()), ("Heartbeat", a.metadata), ("Status", ())):
            call = federation.channel.unary_unary(
                f"/fedmoe.v1.Coordinator/{method}", request_serializer=None, response_deserializer=None
            )
            assert (
                code_of(lambda c=call, m=metadata: c(garbage, metadata=m, timeout=10))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
        push = federation.channel.stream_unary(
            "/fedmoe.v1.Coordinator/Push", request_serializer=None, response_deserializer=None
        )
        assert code_of(lambda: push(iter([garbage]), metadata=a.metadata, timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_9_a_client_offering_density_0_3_trains_and_pushes(tmp_path):
    config = Config(grid=(1,), rounds=1, inner={"steps": 2}, routing={"assign": "turn"})
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        profile = DeviceProfile("odd", 1 << 30, 32, (0.3,))
        summary = run(f"127.0.0.1:{port}", SPEC, profile, data=(DATA.inputs, DATA.targets), timeout_s=120)
    finally:
        server.stop(0).wait()
    assert summary["variant"] == "fp32-p30" and summary["rounds"] == [0] and coordinator.finished


# 10 and 11 --------------------------------------------------------------------------------------
def signed_round(coordinator: Coordinator, keys: dict) -> None:
    """Every member trains the open round and submits, signed."""
    for client_id, key in keys.items():
        a = coordinator.engine.assignments[client_id]
        path_model = copy.deepcopy(SPEC.build(CONFIG.grid, CONFIG.seed).compose(a.path))
        worker = Worker(SPEC, path_model, DATA.batches(16, a.seed), len(DATA), a.variant)
        upload = worker.train_round(coordinator.job(client_id))
        update_id = uuid.uuid4().hex
        digest = update_digest(signed_fields(client_id, update_id, upload), upload.tensors)
        coordinator.submit(upload, client_id, update_id, key.sign(digest))


def enrol(coordinator: Coordinator, keys: list) -> dict:
    """Two members, signing with `keys`: {client id: key}."""
    joined = {}
    for name, key in zip(("a", "b"), keys):
        member = coordinator.join(
            PROFILES["fp32"], name, "", public_bytes(key), FEATURES[0], FEATURES[1], enrolled=True
        )
        joined[member.client_id] = key
    return joined


def test_10_a_coordinator_killed_before_writing_the_ensemble_writes_it_on_restart(tmp_path):
    config = CONFIG.with_overrides({"rounds": 1})
    coordinator = Coordinator(config, tmp_path / "state")
    signed_round(coordinator, enrol(coordinator, [new_signing_key() for _ in range(2)]))
    assert coordinator.finished
    expected, _ = load_checkpoint(tmp_path / "state" / "ensemble")
    shutil.rmtree(tmp_path / "state" / "ensemble")  # as if killed between the last save and the ensemble
    Coordinator(config, tmp_path / "state")
    written, _ = load_checkpoint(tmp_path / "state" / "ensemble")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_11_a_torn_newest_state_falls_back_to_the_previous_generation(tmp_path, caplog):
    keys = [new_signing_key() for _ in range(2)]
    straight, torn = (Coordinator(CONFIG, tmp_path / name) for name in ("straight", "torn"))
    for coordinator in (straight, torn):
        signed_round(coordinator, enrol(coordinator, keys))
        assert coordinator.round == 1
    manifest = tmp_path / "torn" / "state" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # torn after round 0 closed
    with caplog.at_level(logging.WARNING, logger="fedmoe"):
        resumed = Coordinator(CONFIG, tmp_path / "torn")
    assert any("previous generation" in r.getMessage() for r in caplog.records)
    # round 0's acknowledged updates were kept: it closes again, to the same weights
    assert resumed.round == 0 and sorted(resumed.pending) == sorted(straight.members)
    resumed.action(next(iter(resumed.members)))
    assert resumed.round == 1
    ours, theirs = resumed.engine.model.module_states(), straight.engine.model.module_states()
    assert all(torch.equal(ours[k][n], theirs[k][n]) for k in theirs for n in theirs[k])


def test_8_a_member_rejoins_with_a_proof_of_its_pinned_key_once_its_token_is_gone(federation):
    a, _ = federation.joined()
    stub = federation.stub
    again = stub.Join(
        join_request(client_id=a.client_id, public_key=public_bytes(a.signing_key), enrolment=""),
        metadata=a.metadata,
        timeout=10,
    )
    assert again.token != a.token  # a's first token is revoked now: as if this reply had been lost

    def rejoin(key, at_ms):
        request = join_request(client_id=a.client_id, public_key=public_bytes(a.signing_key), enrolment="")
        request.proof_time, request.proof = at_ms, key.sign(rejoin_message(a.client_id, at_ms))
        return stub.Join(request, metadata=a.metadata, timeout=10)

    now = int(time.time() * 1000)
    assert code_of(lambda: rejoin(new_signing_key(), now)) == grpc.StatusCode.UNAUTHENTICATED  # another key
    assert code_of(lambda: rejoin(a.signing_key, now - 3_600_000)) == grpc.StatusCode.UNAUTHENTICATED  # stale
    proven = rejoin(a.signing_key, now)
    assert code_of(lambda: rejoin(a.signing_key, now)) == grpc.StatusCode.UNAUTHENTICATED  # a replay
    renewed = Session(a.client_id, proven.token, a.model, a.assignment, a.signing_key)
    assert federation.heartbeat(renewed).action in (pb.HeartbeatReply.TRAIN, pb.HeartbeatReply.WAIT)
    assert proven.client_id == a.client_id and len(federation.coordinator.members) == 1


def test_6_a_client_certificate_enrols_under_mutual_tls(tmp_path, monkeypatch):
    monkeypatch.delenv(ENROLMENT_ENV)
    certs = make_certs(tmp_path / "certs", clients=("laptop",))
    (certs / "enrolment.token").unlink()  # the certificate alone enrols
    config = CONFIG.with_overrides({"transport.mutual_tls": True, "transport.certs": str(certs)})
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        with connect(f"127.0.0.1:{port}", str(certs), "laptop") as channel:
            session = join(pb_grpc.CoordinatorStub(channel), PROFILES["fp32"], "laptop", FEATURES)
        assert session.client_id in coordinator.members
        with connect(f"127.0.0.1:{port}", str(certs)) as channel:  # no client certificate: no connection
            stub = pb_grpc.CoordinatorStub(channel)
            assert code_of(lambda: stub.Status(pb.StatusRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()


def test_a_clustering_whose_members_all_go_silent_starts_again(tmp_path, caplog):
    now = [0.0]
    config = Config(grid=(2,), rounds=1, policy={"min_clients": 2, "deadline_s": 10})
    coordinator = Coordinator(config, tmp_path / "state", clock=lambda: now[0])
    ids = [
        coordinator.join(PROFILES["fp32"], f"m{i}", public_key=bytes(32), enrolled=True).client_id
        for i in range(2)
    ]
    features = [SPEC.features(DATA.subset(range(i, 100, 2))) for i in range(2)]

    def answer(client_id, f):
        p = coordinator.proposal(client_id)
        s = cluster_stats(f, p.centroids, p.prices, p.softness)
        soft = np.zeros(0) if s.soft is None else s.soft
        coordinator.cluster(client_id, p.number, s.counts, s.sums, s.squares, soft)

    for client_id, f in zip(ids, features):
        answer(client_id, f)
    assert coordinator.passes == 1
    now[0] += 11  # nobody answers pass 1
    with caplog.at_level(logging.WARNING, logger="fedmoe"):
        assert coordinator.action(ids[0]) == ("CLUSTER", [])
    assert any("starts again" in r.getMessage() for r in caplog.records)
    assert coordinator.passes == 0 and coordinator.clustering == ids  # not stuck: it runs again when they do
    while not coordinator.engine.clustered:
        for client_id, f in zip(ids, features):
            answer(client_id, f)
    assert coordinator.engine.kmeans.done


def test_a_member_answering_first_with_other_features_cannot_set_their_width(tmp_path, caplog):
    config = Config(grid=(2,), rounds=1, policy={"min_clients": 3})
    coordinator = Coordinator(config, tmp_path / "state")
    ids = [
        coordinator.join(PROFILES["fp32"], f"m{i}", public_key=bytes(32), enrolled=True).client_id
        for i in range(3)
    ]
    features = SPEC.features(DATA)
    wide = cluster_stats(np.hstack([features, features]), None, None, 0.0)  # twice the width, first
    coordinator.cluster(ids[0], 0, wide.counts, wide.sums, wide.squares, np.zeros(0))
    honest = cluster_stats(features, None, None, 0.0)
    with caplog.at_level(logging.WARNING, logger="fedmoe"):
        for client_id in ids[1:]:
            coordinator.cluster(client_id, 0, honest.counts, honest.sums, honest.squares, np.zeros(0))
    assert coordinator.passes == 1 and coordinator.clustering == ids[1:]
    assert coordinator.proposal(ids[1]).centroids.shape[1] == features.shape[1]
    assert any("another width" in r.getMessage() for r in caplog.records)
