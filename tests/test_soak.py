"""A soak of coordinator kills with real processes: the coordinator is killed ten times at random points
(inside a push before and after it is stored, inside a round close, at the final save, and by SIGKILL at a
random moment) while two SDK clients keep training; the run finishes with every acknowledged update applied
exactly once, and the final ensemble equals an unkilled run's with the same seed."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

from fedmoe.checkpoint import load_checkpoint
from fedmoe.clients import run
from fedmoe.faults import CRASH_ENV, CRASH_STATUS
from fedmoe.spec import load_spec

SPEC = "examples.tabular:spec"
ROUNDS, CLIENTS = 12, 2
POINTS = ("push-read", "push-stored", "round-close", "sigkill")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(port: int, proc: subprocess.Popen) -> bool:
    """Wait until the coordinator accepts connections (False if it exited first)."""
    while proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def rounds_closed(log: Path) -> int:
    """How many round closes the coordinators have logged so far."""
    return log.read_text().count(" closed: updates ")


def server(port: int, state: Path, log: Path, crash: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if crash:
        env[CRASH_ENV] = crash
    args = [sys.executable, "-m", "fedmoe.cli", "server", "--spec", SPEC, "--address", f"127.0.0.1:{port}"]
    args += ["--state", str(state), "--grid", "2", "--rounds", str(ROUNDS), "--steps", "3"]
    args += ["--min-clients", str(CLIENTS), "--deadline", "600", "--exit-when-done", "--verbose"]
    with open(log, "a") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def federation(tmp_path: Path, plan: list[str]) -> tuple[dict, list[int]]:
    """Train with the coordinator killed as `plan` says; the final ensemble's tensors and each exit status."""
    tmp_path.mkdir(parents=True)
    port, state, log = free_port(), tmp_path / "state", tmp_path / "server.log"
    spec = load_spec(SPEC)
    summaries, errors = {}, []

    def client(i: int) -> None:
        try:
            data = spec.data(i, CLIENTS)
            state_file = str(tmp_path / f"client{i}.json")
            summaries[i] = run(
                f"127.0.0.1:{port}", SPEC, data=data, state_file=state_file, retry_s=60, timeout_s=100
            )
        except (OSError, ValueError, RuntimeError, grpc.RpcError) as e:  # reported by the test below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    statuses, rng = [], random.Random(0)
    for step in [*plan, None]:
        crash = None if step in (None, "sigkill") else f"{step}:1"
        proc = server(port, state, log, crash)
        if not statuses:  # the clients join one after the other: the same ids and seeds in every run
            for i, t in enumerate(threads):
                t.start()
                while i + 1 < CLIENTS and not (tmp_path / f"client{i}.json").exists() and proc.poll() is None:
                    time.sleep(0.05)
        if step == "sigkill" and serving(port, proc):
            # somewhere in its rounds: at a random moment, but before a second round closes (a round can take
            # 40 ms: a kill by the clock alone let the run end before the planned final-save kill)
            closed, until = rounds_closed(log), time.monotonic() + rng.uniform(0.1, 1.0)
            while rounds_closed(log) == closed and proc.poll() is None and time.monotonic() < until:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        statuses.append(proc.wait(timeout=100))
    for t in threads:
        t.join(100)
    assert not errors and len(summaries) == CLIENTS, (errors, log.read_text()[-3000:])
    tensors, manifest = load_checkpoint(state / "ensemble")
    updates = [m["updates"] for m in manifest["metrics"]]
    assert updates == [CLIENTS] * ROUNDS, updates  # no update lost, none applied twice
    return tensors, statuses


def test_ten_coordinator_kills_lose_nothing_and_change_nothing(tmp_path):
    rng = random.Random(1)
    plan = ["push-read", "push-stored", "round-close"] + [rng.choice(POINTS) for _ in range(6)]
    rng.shuffle(plan)
    plan.append("final-save")
    killed, statuses = federation(tmp_path / "killed", plan)
    assert statuses[:-1] == [CRASH_STATUS if p != "sigkill" else -signal.SIGKILL for p in plan]
    assert len(plan) == 10 and statuses[-1] == 0
    straight, statuses = federation(tmp_path / "straight", [])
    assert statuses == [0]
    assert killed.keys() == straight.keys() and all(torch.equal(killed[k], straight[k]) for k in straight)
