"""The coordinator aggregates updates as they arrive, in memory of one grid, and waiting clients are held
(a long-poll) instead of polling: streamed sums equal the batch ones bit for bit, a restart folds the stored
updates in again in their arrival order, a held heartbeat is answered when the round closes, and a stream
waits its turn for a place."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import grpc
import pytest
import torch

from fedmoe.aggregate import Aggregation, clipped, robust_average
from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import connect, join, join_request
from fedmoe.compress.quant import quantize
from fedmoe.config import Config
from fedmoe.outer import ModuleStates, Update
from fedmoe.security import TokenAuthority, given_enrolment, new_signing_key, public_bytes, update_digest
from fedmoe.server.coordinator import Coordinator, Rejected
from fedmoe.server.service import CoordinatorService, Streams, start_server
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.worker import Upload, signed_fields

SPEC = load_spec("fedmoe.models.digits:spec")
FEATURES = SPEC.feature_statistics(SPEC.data(0, 2).train.subset(range(100)))  # 100 examples


def config(**overrides) -> Config:
    """One path, paths in turn; a round closes when every member sent (or after 10 minutes)."""
    settings = {
        "grid": (1,),
        "rounds": 3,
        "routing": {"assign": "turn"},
        "policy": {"min_clients": 1, "deadline_s": 600},
    }
    return Config(**settings).with_overrides(overrides)


def enrol(coordinator: Coordinator, profiles: list[str]) -> dict:
    """A member per profile: {client id: signing key}."""
    keys = {}
    for profile in profiles:
        key = new_signing_key()
        member = coordinator.join(
            PROFILES[profile], profile, "", public_bytes(key), FEATURES[0], FEATURES[1], enrolled=True
        )
        keys[member.client_id] = key
    return keys


def random_upload(coordinator: Coordinator, worker_id: str, seed: int, weight: float) -> Upload:
    """An update of the open round with random outer gradients of the shapes the worker sends."""
    a, generator = coordinator.engine.assignments[worker_id], torch.Generator().manual_seed(seed)
    expected = coordinator.engine.expected_upload(worker_id, coordinator.round)
    tensors = {
        n: quantize(torch.randn(shape, generator=generator) * 0.01, bits)
        for n, (bits, shape) in expected.items()
    }
    return Upload(a.path, a.variant, coordinator.round, a.seed, weight, tensors, 1.0)


def submit(coordinator: Coordinator, keys: dict, worker_id: str, upload: Upload) -> int:
    """Submit `upload`, signed by its member's key; the open round."""
    update_id = uuid.uuid4().hex
    signature = keys[worker_id].sign(
        update_digest(signed_fields(worker_id, update_id, upload), upload.tensors)
    )
    return coordinator.submit(upload, worker_id, update_id, signature)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a
    )


def reference_mean(updates: list[Update]) -> tuple[ModuleStates, ModuleStates]:
    """The weighted mean of the outer gradients per coordinate over the updates holding it, all at once."""
    sums: ModuleStates = {}
    totals: ModuleStates = {}
    for update in updates:
        if update.weight <= 0:
            raise ValueError(f"update weight must be positive, got {update.weight}")
        masks = update.masks or {}
        for key, state in update.deltas.items():
            acc = sums.setdefault(key, {})
            tot = totals.setdefault(key, {})
            for name, t in state.items():
                mask = masks.get(key, {}).get(name)
                w = torch.full_like(t, update.weight) if mask is None else mask.to(t.dtype) * update.weight
                acc[name] = acc[name] + w * t if name in acc else w * t
                tot[name] = tot[name] + w if name in tot else w
    mean = {
        k: {n: torch.where(totals[k][n] > 0, t / totals[k][n].clamp_min(1e-30), 0.0) for n, t in s.items()}
        for k, s in sums.items()
    }
    held = {k: {n: w > 0 for n, w in s.items()} for k, s in totals.items()}
    return mean, held


def test_streamed_aggregation_equals_the_batch_rules_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    updates = []
    for i in range(9):
        deltas = {
            key: {"w": torch.randn(6, 5, generator=generator), "b": torch.randn(5, generator=generator)}
            for key in ("0.0", "0.1")[: 1 + i % 2]
        }
        masks = None
        if i % 3 == 1:  # a pruned worker: it holds some rows of "w"
            masks = {"0.0": {"w": torch.rand(6, 1, generator=generator).expand(6, 5) > 0.5}}
        updates.append(Update(deltas, weight=1.0 + 7.3 * i, masks=masks))
    for rule, batch in (
        ("mean", reference_mean),
        ("median", lambda us: robust_average(us, "median", 0.2)),
        ("trimmed-mean", lambda us: robust_average(us, "trimmed-mean", 0.2)),
    ):
        for clip_norm in (None, 2.0):
            streamed = Aggregation(rule, 0.2, clip_norm)
            for update in updates:
                streamed.add(update)
            expected = batch([u if clip_norm is None else clipped(u, clip_norm) for u in updates])
            mean, held = streamed.result()
            assert states_equal(mean, expected[0]) and states_equal(held, expected[1]), (rule, clip_norm)
    with pytest.raises(ValueError, match="positive"):
        Aggregation().add(Update({"0.0": {"b": torch.zeros(2)}}, 0.0))


def test_the_coordinator_holds_one_grid_whatever_the_number_of_updates(tmp_path):
    coordinator = Coordinator(config(), tmp_path / "state")
    keys = enrol(coordinator, ["fp32", "int4-p50"] * 6)  # 12 members: 11 updates leave the round open
    grid_bytes = sum(p.nbytes for p in coordinator.engine.model.parameters())
    held = []
    for i, worker_id in enumerate(list(keys)[:11]):
        submit(coordinator, keys, worker_id, random_upload(coordinator, worker_id, i, 50.0 + i))
        held.append(coordinator.aggregation.nbytes)
    assert coordinator.round == 0 and len(coordinator.pending) == 11
    # a running sum per parameter, and per coordinate the weight of the workers that held it
    assert held[1:] == [held[1]] * 10 and held[1] <= 2 * grid_bytes, (held, grid_bytes)
    # what each pending update leaves besides: its header, no tensors (no learned router here)
    assert all(not received.router for received, _ in coordinator.pending.values())
    # the median keeps every update, as documented
    robust = Coordinator(config(**{"aggregation.rule": "median"}), tmp_path / "median")
    keys = enrol(robust, ["fp32"] * 4)
    for i, worker_id in enumerate(list(keys)[:3]):
        submit(robust, keys, worker_id, random_upload(robust, worker_id, i, 50.0))
    assert robust.aggregation.nbytes == 3 * grid_bytes


def test_a_restart_folds_the_stored_updates_in_again_in_their_arrival_order(tmp_path):
    straight = Coordinator(config(), tmp_path / "state")
    keys = enrol(straight, ["fp32", "int8", "int4-p50", "fp32"])
    ids = list(keys)
    uploads = {w: random_upload(straight, w, i, 13.0 + 29 * i) for i, w in enumerate(ids)}
    arrival = [ids[3], ids[0], ids[2]]  # neither enrolment nor name order
    for worker_id in arrival:
        submit(straight, keys, worker_id, uploads[worker_id])
    # the coordinator is killed here; another one starts from its state directory
    resumed = Coordinator(config(), tmp_path / "state")
    assert list(resumed.pending) == arrival
    assert states_equal(resumed.aggregation.sums, straight.aggregation.sums)
    # the order matters: the same updates summed in enrolment order differ in the last bits
    enrolment_order = Aggregation()
    for worker_id in sorted(arrival, key=ids.index):
        enrolment_order.add(straight.engine.decode(worker_id, uploads[worker_id]))
    assert not states_equal(enrolment_order.sums, straight.aggregation.sums)
    for coordinator in (straight, resumed):
        submit(coordinator, keys, ids[1], uploads[ids[1]])
        assert coordinator.round == 1
    assert states_equal(resumed.engine.model.module_states(), straight.engine.model.module_states())
    assert resumed.metrics == straight.metrics


def test_updates_are_folded_in_by_arrival_even_when_their_writes_end_out_of_order(tmp_path, monkeypatch):
    coordinator = Coordinator(config(), tmp_path / "state")
    keys = enrol(coordinator, ["fp32"] * 3)
    first, second, _ = list(keys)
    release, writing = threading.Event(), threading.Event()
    real_write = coordinator.write_pending

    def slow_first(worker_id, *args):
        if worker_id == first:
            writing.set()
            assert release.wait(10)
        real_write(worker_id, *args)

    monkeypatch.setattr(coordinator, "write_pending", slow_first)
    slow = threading.Thread(
        target=submit, args=(coordinator, keys, first, random_upload(coordinator, first, 0, 40.0))
    )
    slow.start()
    assert writing.wait(10)
    submit(coordinator, keys, second, random_upload(coordinator, second, 1, 60.0))  # durable: acknowledged
    assert not coordinator.pending and not coordinator.aggregation.counts  # not folded in before the first
    release.set()
    slow.join(10)
    assert list(coordinator.pending) == [first, second] and coordinator.aggregation.counts == {"0.0": 2}


def test_a_waiting_client_is_held_until_the_round_closes(tmp_path):
    coordinator = Coordinator(config(**{"policy.min_clients": 2}), tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    channel = connect(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        sessions = [
            join(stub, PROFILES["fp32"], "x", FEATURES, enrolment=given_enrolment()) for _ in range(2)
        ]
        keys = {s.client_id: s.signing_key for s in sessions}
        a, b = (s.client_id for s in sessions)
        submit(coordinator, keys, a, random_upload(coordinator, a, 0, 50.0))

        def heartbeat(wait_s: float, **kwargs) -> pb.HeartbeatReply:
            request = pb.HeartbeatRequest(client_id=a, wait_s=wait_s)
            return stub.Heartbeat(request, metadata=sessions[0].metadata, timeout=60, **kwargs)

        started = time.monotonic()
        assert heartbeat(0.0).action == pb.HeartbeatReply.WAIT and time.monotonic() - started < 0.2
        started = time.monotonic()
        assert heartbeat(0.5).action == pb.HeartbeatReply.WAIT and time.monotonic() - started >= 0.45
        with pytest.raises(grpc.RpcError) as refused:
            heartbeat(-1.0)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        call = stub.Heartbeat.future(
            pb.HeartbeatRequest(client_id=a, wait_s=30), metadata=sessions[0].metadata, timeout=60
        )
        deadline = time.monotonic() + 5
        while a not in coordinator.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        call.cancel()  # the client goes away: its wait ends with it
        while coordinator.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.02)

        replies = []
        held = threading.Thread(target=lambda: replies.append((heartbeat(30.0), time.monotonic())))
        held.start()
        time.sleep(0.3)
        assert not replies and a in coordinator.waiting
        closed = time.monotonic()
        submit(coordinator, keys, b, random_upload(coordinator, b, 1, 50.0))  # the round closes
        held.join(10)
        ((reply, answered),) = replies
        assert reply.action == pb.HeartbeatReply.TRAIN and reply.round == 1 and answered - closed < 1.0

        submit(coordinator, keys, a, random_upload(coordinator, a, 2, 50.0))
        ended = []

        def held_until_stopped() -> None:
            with pytest.raises(grpc.RpcError) as error:
                heartbeat(30.0)
            ended.append(error.value.code())

        held = threading.Thread(target=held_until_stopped, daemon=True)
        held.start()
        while a not in coordinator.waiting:
            assert time.monotonic() < deadline + 5
            time.sleep(0.02)
        stopped = time.monotonic()
        server.stop(0).wait()  # a held call does not keep the server from stopping
        held.join(5)
        assert ended == [grpc.StatusCode.UNAVAILABLE] and time.monotonic() - stopped < 5
        while coordinator.waiting:  # and the server's thread is let go
            assert time.monotonic() < stopped + 5
            time.sleep(0.02)
    finally:
        channel.close()
        server.stop(0).wait()


def test_held_heartbeats_take_no_thread_and_are_all_answered_when_the_round_opens(tmp_path):
    members = 64
    settings = {"policy.min_clients": members + 1, "transport.threads": 2, "transport.max_streams": 1}
    coordinator = Coordinator(config(**settings), tmp_path / "state")
    keys = enrol(coordinator, ["fp32"] * members)  # one short of the first round: every member waits
    server, port = start_server(coordinator, "127.0.0.1:0")
    tokens = TokenAuthority.load_or_create(tmp_path / "state" / "token.secret")
    channel = connect(f"127.0.0.1:{port}")
    calls = []
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Status(pb.StatusRequest(), timeout=10)  # the server's pools have started
        threads = threading.active_count()
        for client_id in keys:
            token = tokens.issue(coordinator.members[client_id].token_subject)
            request = pb.HeartbeatRequest(client_id=client_id, wait_s=30)
            metadata = (("authorization", f"Bearer {token}"),)
            calls.append(stub.Heartbeat.future(request, metadata=metadata, timeout=60))
        deadline = time.monotonic() + 10
        while len(coordinator.waiting) < members:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert threading.active_count() - threads <= 4  # a thread per held call would add 64
        started = time.monotonic()
        stub.Status(pb.StatusRequest(), timeout=10)  # served beside them, on 2 threads
        assert time.monotonic() - started < 1.0
        join(stub, PROFILES["fp32"], "last", FEATURES, enrolment=given_enrolment())  # round 0 opens
        replies = [call.result(timeout=10) for call in calls]
        assert {reply.action for reply in replies} == {pb.HeartbeatReply.TRAIN}
        assert not coordinator.waiting
    finally:
        for call in calls:
            call.cancel()
        channel.close()
        server.stop(0).wait()


def test_joins_waiting_for_the_state_write_take_no_thread_and_share_one_write(tmp_path, monkeypatch):
    import fedmoe.server.coordinator as coordinator_module

    joiners = 32
    coordinator = Coordinator(config(**{"policy.min_clients": 100, "transport.threads": 2}), tmp_path / "s")
    server, port = start_server(coordinator, "127.0.0.1:0")
    channel = connect(f"127.0.0.1:{port}")
    writes, writing, release = [], threading.Event(), threading.Event()
    save = coordinator_module.save_checkpoint

    def held_save(*args, **kwargs):
        writes.append(1)
        writing.set()
        assert release.wait(30)
        return save(*args, **kwargs)

    try:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Status(pb.StatusRequest(), timeout=10)  # the server's pools have started
        threads = threading.active_count()
        monkeypatch.setattr(coordinator_module, "save_checkpoint", held_save)
        enrolment = given_enrolment()
        requests = [
            join_request(PROFILES["fp32"], f"j{i}", FEATURES, new_signing_key(), enrolment=enrolment)[0]
            for i in range(joiners)
        ]
        calls = [stub.Join.future(request, timeout=60) for request in requests]
        assert writing.wait(10)  # the first join's write is held: the others join and wait behind it
        deadline = time.monotonic() + 10
        while len(coordinator.members) < joiners:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not any(call.done() for call in calls)  # none is answered before it is on disk
        assert threading.active_count() - threads <= 4  # a thread per waiting join would add 31
        release.set()
        replies = [call.result(timeout=30) for call in calls]
        assert len({reply.client_id for reply in replies}) == joiners
        assert len(writes) <= 3  # the first, and one for every join that arrived while it was written
    finally:
        release.set()
        channel.close()
        server.stop(0).wait()


def test_a_pull_that_ends_while_its_delivery_is_encoded_leaves_the_encoding_to_the_others(
    tmp_path, monkeypatch
):
    import fedmoe.server.service as service_module

    coordinator = Coordinator(config(), tmp_path / "state")
    (worker,) = enrol(coordinator, ["fp32"])
    service = CoordinatorService(coordinator, TokenAuthority(bytes(32)), "")
    encode = service_module.encoded_frames

    def slowly(tensors: dict) -> list[bytes]:
        time.sleep(0.3)
        return encode(tensors)

    monkeypatch.setattr(service_module, "encoded_frames", slowly)
    job = coordinator.job(worker)

    async def scenario() -> None:
        first = asyncio.create_task(service.frames(job))
        second = asyncio.create_task(service.frames(job))
        await asyncio.sleep(0.1)
        first.cancel()  # its client went away while the delivery was being encoded
        frames = await asyncio.wait_for(second, 5)
        assert frames and await service.frames(job) == frames  # later pulls are served the same frames

    try:
        asyncio.run(scenario())
    finally:
        service.calls.shutdown()


def test_a_stream_waits_its_turn_for_a_place_but_a_client_ended_for_silence_does_not(monkeypatch):
    import fedmoe.server.service as service_module

    monkeypatch.setattr(service_module, "PREEMPT_S", 0.3)

    async def scenario() -> None:
        streams = Streams(limit=1, idle_s=30.0, max_s=60.0)
        served = []

        async def second() -> None:
            async with streams.slot("b"):
                served.append(time.monotonic())

        async with streams.slot("a") as moving:
            moving.touch()  # it moves: it keeps its place
            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.2)
            assert not served  # waiting for the place, not refused
            moving.touch()
            freed = time.monotonic()
        await asyncio.wait_for(waiting, 5)
        assert served and served[0] - freed < 0.5

        async def silent() -> None:
            async with streams.slot("c"):  # moves its first message, then nothing
                await asyncio.sleep(30)

        silent_stream = asyncio.create_task(silent())
        await asyncio.sleep(0.35)
        async with streams.slot("d") as taker:  # takes the stalled stream's place
            taker.touch()
            with pytest.raises(Rejected) as ended:
                await asyncio.wait_for(silent_stream, 1)
            assert ended.value.code == "CANCELLED" and "silent" in ended.value.detail
            started = time.monotonic()
            with pytest.raises(Rejected) as refused:
                async with streams.slot("c"):  # c waits in no line now
                    pass
            assert refused.value.code == "UNAVAILABLE" and time.monotonic() - started < 0.2

        async with streams.call("e"), streams.call("e"):  # two calls of one client at once, not three
            with pytest.raises(Rejected) as third:
                async with streams.call("e"):
                    pass
            assert third.value.code == "UNAVAILABLE"
        async with streams.call("e"):
            pass

    asyncio.run(scenario())


def test_a_round_opens_once_its_state_is_saved_and_the_write_holds_no_call(tmp_path, monkeypatch):
    import fedmoe.server.coordinator as coordinator_module

    coordinator = Coordinator(config(), tmp_path / "state")
    keys = enrol(coordinator, ["fp32", "fp32"])
    a, b = keys
    writing, release = threading.Event(), threading.Event()
    save = coordinator_module.save_checkpoint

    def slow_save(*args, **kwargs):
        writing.set()
        assert release.wait(30)
        return save(*args, **kwargs)

    monkeypatch.setattr(coordinator_module, "save_checkpoint", slow_save)
    assert submit(coordinator, keys, a, random_upload(coordinator, a, 0, 1.0)) == 0
    opened: list[int] = []
    closing = threading.Thread(
        target=lambda: opened.append(submit(coordinator, keys, b, random_upload(coordinator, b, 1, 1.0)))
    )
    closing.start()
    assert writing.wait(30)  # the round closed, its state is being written
    # the lock is free: members are heard, told to wait, and a pull waits for the next round to open
    assert coordinator.lock.acquire(timeout=1.0)
    coordinator.lock.release()
    assert coordinator.action(a) == ("WAIT", [])
    with pytest.raises(Rejected) as refused:
        coordinator.job(a)
    assert refused.value.code == "UNAVAILABLE"
    assert coordinator.status()["round"] == 1 and not opened  # the closing push waits for the opening
    release.set()
    closing.join(30)
    assert opened == [1] and coordinator.action(a) == ("TRAIN", [a]) and coordinator.job(a).round == 1
    resumed = Coordinator(config(), tmp_path / "state")  # what the members were told is on disk
    assert resumed.round == 1
