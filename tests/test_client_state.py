"""A client's durable state beside its --state-file, over real gRPC: a client killed mid-run continues as if
it had not stopped (its optimiser, error feedback and data stream, its signing key), an update whose
acknowledgement was lost counts once, and an acknowledged update the coordinator lost is sent again."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import (
    ClientState,
    Crew,
    Retry,
    connect,
    join,
    leave,
    prepare_data,
    push,
    run,
    send_update,
)
from fedmoe.config import Config
from fedmoe.security import enrolment_token, public_bytes
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.service import start_server
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc

SPEC = load_spec("examples.tabular:spec")
CONFIG = Config(
    spec="examples.tabular:spec",
    grid=(1,),
    rounds=4,
    inner={"steps": 20},
    routing={"assign": "turn"},
    policy={"min_clients": 1, "deadline_s": 600, "late": "stale"},
)
ROOT = Path(__file__).resolve().parent.parent
RETRY = Retry("coordinator", 30.0)


class Killer(Coordinator):
    """A coordinator that SIGKILLs the client process `victim` once while it pulls round `at_pull`, and once
    right after storing its update of round `at_push`, before the acknowledgement leaves."""

    victim: int = 0
    at_pull: int | None = None
    at_push: int | None = None

    def job(self, client_id, worker_id=""):
        job = super().job(client_id, worker_id)
        if job.round == self.at_pull:
            self.at_pull = None
            os.kill(self.victim, signal.SIGKILL)
        return job

    def submit(self, upload, client_id, update_id, signature=b"", worker_id="", spool=None):
        open_round = super().submit(upload, client_id, update_id, signature, worker_id, spool)
        if upload.round == self.at_push:
            self.at_push = None
            os.kill(self.victim, signal.SIGKILL)
        return open_round


def train_with_kills(state: Path, at_pull: int | None, at_push: int | None) -> tuple[Killer, int]:
    """Run CONFIG with one `fedmoe client` process (int8: error feedback), restarted with its state file
    each time it is killed; the coordinator and how many times the client started."""
    coordinator = Killer(CONFIG, state / "coordinator")
    coordinator.at_pull, coordinator.at_push = at_pull, at_push
    server, port = start_server(coordinator, "127.0.0.1:0")
    command = [sys.executable, "-m", "fedmoe.cli", "client", "--server", f"127.0.0.1:{port}"]
    command += ["--profile", "int8", "--state-file", str(state / "client.json"), "--timeout", "60"]
    command += ["--enrol", enrolment_token(state / "coordinator"), "--quiet"]
    starts = 0
    try:
        while True:
            starts += 1
            proc = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            coordinator.victim = proc.pid
            _, err = proc.communicate(timeout=90)
            if proc.returncode != -signal.SIGKILL:
                assert proc.returncode == 0, err[-3000:]
                return coordinator, starts
    finally:
        server.stop(0).wait()


def test_a_killed_client_continues_as_if_it_had_not_stopped(tmp_path: Path) -> None:
    reference = Coordinator(CONFIG, tmp_path / "reference")
    server, port = start_server(reference, "127.0.0.1:0")
    try:  # the same client, in this process and never killed
        run(f"127.0.0.1:{port}", None, "int8", state_file=str(tmp_path / "reference.json"), timeout_s=60)
    finally:
        server.stop(0).wait()
    # killed while pulling round 1, then right after its round-2 update was stored: that update's
    # acknowledgement is lost, it is sent again with its id (late updates count: it must not count twice)
    killed, starts = train_with_kills(tmp_path / "killed", 1, 2)
    assert starts == 3 and killed.finished
    assert [m["updates"] for m in killed.metrics] == [1] * CONFIG.rounds
    ours, theirs = killed.engine.model.module_states(), reference.engine.model.module_states()
    difference = max((ours[k][n] - theirs[k][n]).abs().max().item() for k in theirs for n in theirs[k])
    print(f"killed twice: max weight difference to the unkilled run {difference:.2e}")
    assert difference <= 1e-6
    saved = json.loads((tmp_path / "killed" / "client.json").read_text())
    assert set(saved) == {"client_id", "token", "signing_key", "acknowledged"}
    assert (tmp_path / "killed" / "client.json").stat().st_mode & 0o777 == 0o600
    member = killed.members[saved["client_id"]]
    assert len(killed.members) == 1  # it rejoined as itself, with the key it joined with
    key = ClientState(tmp_path / "killed" / "client.json").signing_key()
    assert member.public_key == public_bytes(key).hex()


@pytest.fixture
def federation(tmp_path):
    """An in-process coordinator of two clients (paths in turn, late updates count), its port, a stub."""
    config = CONFIG.with_overrides({"grid": (2,), "rounds": 2, "policy.min_clients": 2})
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    channel = connect(f"127.0.0.1:{port}")
    try:
        yield coordinator, port, pb_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        server.stop(0).wait()


def member(stub, coordinator, partition: int, state: ClientState | None = None):
    """A client of the federation fixture holding spec.data(partition, 2): its session and crew."""
    local = prepare_data(SPEC, None, None, partition, 2)
    features = SPEC.feature_statistics(local.train)
    token = enrolment_token(coordinator.state_dir)
    session = join(stub, PROFILES["fp32"], f"p{partition}", features, state, RETRY, token)
    crew = Crew(SPEC, coordinator.model, local, state=state)
    crew.add_turn(session.client_id, session.assignment)
    return session, crew


def test_an_update_whose_acknowledgement_was_lost_counts_once(federation) -> None:
    coordinator, _, stub = federation
    (a, crew_a), (b, crew_b) = member(stub, coordinator, 0), member(stub, coordinator, 1)
    trained: dict[str, list[int]] = {}
    assert send_update(stub, a, crew_a, a.client_id, 0, RETRY, trained) > 0
    held = crew_a.held[a.client_id]
    held.acknowledged = False  # the acknowledgement was lost: the client sends it again, with its id
    assert send_update(stub, a, crew_a, a.client_id, 0, RETRY, trained) == 0
    assert crew_a.held[a.client_id] is held and held.acknowledged and len(coordinator.pending) == 1
    assert send_update(stub, b, crew_b, b.client_id, 0, RETRY, trained) > 0
    assert coordinator.round == 1 and coordinator.metrics[0]["updates"] == 2
    # sent again after its round closed, it would count as a late update of round 1: it is refused
    held.acknowledged = False
    with pytest.raises(grpc.RpcError) as error:
        push(stub, a, held.upload, held.update_id, a.client_id)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS and not coordinator.pending
    assert send_update(stub, a, crew_a, a.client_id, 1, RETRY, trained) == 0  # the same, through the client
    assert crew_a.held[a.client_id] is held and not coordinator.pending
    assert send_update(stub, a, crew_a, a.client_id, 1, RETRY, trained) > 0  # now its round-1 update
    assert crew_a.held[a.client_id].upload.round == 1 and list(coordinator.pending) == [a.client_id]


def test_an_acknowledged_update_the_coordinator_lost_is_sent_again(tmp_path) -> None:
    config = CONFIG.with_overrides({"grid": (2,), "rounds": 1, "policy.min_clients": 2})
    state_dir, client_file = tmp_path / "state", tmp_path / "a.json"
    first = Coordinator(config, state_dir)
    server, port = start_server(first, "127.0.0.1:0")
    outcome: list = []

    def client_a() -> None:
        try:
            outcome.append(
                run(
                    f"127.0.0.1:{port}",
                    SPEC,
                    partition=0,
                    partitions=2,
                    state_file=str(client_file),
                    enrolment=enrolment_token(state_dir),
                    poll_s=0.05,
                    timeout_s=60,
                )
            )
        except Exception as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    def acknowledged() -> dict[str, str]:
        return json.loads(client_file.read_text())["acknowledged"] if client_file.exists() else {}

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline and not outcome, outcome
            time.sleep(0.02)

    thread = threading.Thread(target=client_a, daemon=True)
    channel = connect(f"127.0.0.1:{port}")
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        thread.start()
        wait_until(lambda: first.members)
        b, crew_b = member(stub, first, 1)
        wait_until(lambda: "c0000" in acknowledged())  # a's round-0 update is stored and acknowledged
        server.stop(0).wait()
        (stored,) = (state_dir / "pending").glob("r*")
        stored.write_bytes(stored.read_bytes()[:-5])  # torn: the coordinator cannot read it when it restarts
        second = Coordinator(config, state_dir)
        assert not second.pending
        server, _ = start_server(second, f"127.0.0.1:{port}")
        wait_until(lambda: "c0000" in second.pending)  # asked for it again, a sends the update it holds
        assert second.read_pending(stored)[1] == acknowledged()["c0000"]  # with its id
        assert send_update(stub, b, crew_b, b.client_id, 0, RETRY, {}) > 0
        thread.join(60)
        assert isinstance(outcome[0], dict), outcome
        assert second.finished and second.metrics[0]["updates"] == 2
    finally:
        channel.close()
        server.stop(0).wait()


def test_a_restarted_client_rejoins_with_its_key_and_no_enrolment_token(federation, tmp_path) -> None:
    coordinator, port, stub = federation
    state = ClientState(tmp_path / "c.json")
    features = SPEC.feature_statistics(SPEC.data(0, 2).train)
    first = join(stub, PROFILES["fp32"], "c", features, state, RETRY, enrolment_token(coordinator.state_dir))
    again = join(stub, PROFILES["fp32"], "c", features, ClientState(tmp_path / "c.json"), RETRY)
    assert again.client_id == first.client_id and len(coordinator.members) == 1
    assert public_bytes(again.signing_key) == public_bytes(first.signing_key)
    assert coordinator.members[first.client_id].public_key == public_bytes(first.signing_key).hex()
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
    assert leave(f"127.0.0.1:{port}", tmp_path / "c.json") == first.client_id
    assert not (tmp_path / "c.json").exists()
