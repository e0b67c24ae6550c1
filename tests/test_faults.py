"""Faults with real processes: a client killed mid-training that rejoins, a coordinator killed mid-run and
restarted from its state directory, and a client that drops off in the middle of a Pull."""

import json
import signal
import socket
import subprocess
import sys
import time

import torch

from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import connect, join
from fedmoe.config import Config
from fedmoe.ensemble import Ensemble
from fedmoe.modular import Path
from fedmoe.security import given_enrolment
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.service import start_server
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_round(state) -> int:
    manifest = state / "state" / "manifest.json"
    return json.loads(manifest.read_text())["engine"]["round"] if manifest.exists() else 0


def wait_until(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_killed_client_rejoins_and_killed_coordinator_resumes(tmp_path):
    port, state = free_port(), tmp_path / "state"
    server_args = FEDMOE + [
        "server",
        "--address",
        f"127.0.0.1:{port}",
        "--state",
        str(state),
        "--grid",
        "3",
        "--rounds",
        "4",
        "--steps",
        "150",
        "--min-clients",
        "3",
        "--deadline",
        "15",
        "--routing",
        "turn",
        "--exit-when-done",
    ]

    def coordinator_process():
        with open(tmp_path / "server.log", "a") as log:
            return subprocess.Popen(server_args, stdout=log, stderr=subprocess.STDOUT)

    coordinator = coordinator_process()

    def client(name, profile, partition):
        return subprocess.Popen(
            FEDMOE
            + [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--profile",
                profile,
                "--timeout",
                "240",
                "--partition",
                str(partition),
                "--partitions",
                "3",
                "--state-file",
                str(tmp_path / f"{name}.json"),
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    clients = {"a": client("a", "fp32", 0), "b": client("b", "int8", 1), "c": client("c", "int4-p50", 2)}
    procs = [coordinator, *clients.values()]
    try:
        wait_until(lambda: saved_round(state) >= 1)
        clients["b"].send_signal(signal.SIGKILL)  # mid-training or mid-call: it never says goodbye
        clients["b"].wait()
        wait_until(lambda: saved_round(state) >= 2)  # the round closes at its deadline without b
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        coordinator = coordinator_process()  # restarted from its state directory
        clients["b"] = client("b", "int8", 1)  # b comes back with the identity in its state file
        procs += [coordinator, clients["b"]]
        for name, proc in clients.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert coordinator.wait(timeout=60) == 0
    finally:
        for proc in procs:
            proc.kill()
    manifest = json.loads((state / "state" / "manifest.json").read_text())
    # b rejoined as itself, not as a fourth member
    assert manifest["engine"]["round"] == 4 and len(manifest["members"]) == 3
    updates = [m["updates"] for m in manifest["metrics"]]
    assert len(updates) == 4 and min(updates) >= 1 and max(updates) <= 3
    assert min(updates) < 3  # a round closed at its deadline without b
    assert 3 in updates[2:]  # and b, restarted with the coordinator, trained again
    spec = load_spec("fedmoe.models.digits:spec")
    assert Ensemble.load(state / "ensemble").score(spec.eval_data(), top_k=1)["accuracy"] > 0.5


def test_a_client_that_drops_off_mid_pull_changes_nothing(tmp_path):
    config = Config(grid=(1,), rounds=1, inner={"steps": 1}, routing={"assign": "turn"})
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            spec = coordinator.spec
            session = join(
                stub,
                PROFILES["fp32"],
                "x",
                spec.feature_statistics(spec.data(0, 1).train),
                enrolment=given_enrolment(),
            )
            before = {
                k: {n: t.clone() for n, t in s.items()}
                for k, s in coordinator.engine.model.module_states().items()
            }
            call = stub.Pull(pb.PullRequest(client_id=session.client_id), metadata=session.metadata)
            next(call)  # the assignment frame, then the client goes away
            call.cancel()
            frames = list(stub.Pull(pb.PullRequest(client_id=session.client_id), metadata=session.metadata))
            # it can simply pull again
            assert frames[0].WhichOneof("frame") == "assignment"
            pulled = decode_tensors((f.tensor for f in frames[1:]), 1 << 30)
            path = coordinator.engine.model.compose(Path.parse(frames[0].assignment.path))
            assert pulled.keys() == dict(path.named_parameters()).keys()  # the whole delivery, again
            after = coordinator.engine.model.module_states()
            assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])
            assert not coordinator.pending and coordinator.round == 0
    finally:
        server.stop(0).wait()
