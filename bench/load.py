"""Load benchmark on loopback: N concurrent clients heartbeat, pull and push small signed updates to a
coordinator running as its own process. For each N it prints RPC latency percentiles, errors and
accepted updates per second, then the largest N held with p99 under 1 s and no errors. Then, with 32
clients, S more members each hold a Push stream open that sends nothing (reopening it whenever the
coordinator ends or refuses it), and the table shows heartbeat and Status latencies under that stall.

    python bench/load.py                      # N = 8, 32, 64, 128, 256; then S = 16, 64 stalled streams
    python bench/load.py --clients 16 64 --stalled 16 --seconds 10
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import torch
from rich.console import Console
from rich.table import Table

from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import Retry, connect, join, push_frames, variant_of
from fedmoe.compress.quant import quantize
from fedmoe.config import DEFAULT_SPEC
from fedmoe.modular import Path
from fedmoe.security import ENROLMENT_ENV
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors
from fedmoe.worker import Upload

SPEC = load_spec(DEFAULT_SPEC)
ENROLMENT = os.environ.setdefault(
    ENROLMENT_ENV, "bench-load-enrolment-token-0123456789"
)  # the coordinator's too


def start_coordinator(n: int, state: str) -> tuple[subprocess.Popen, int]:
    """A `fedmoe server` process (paths in turn) whose rounds close when all n clients pushed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedmoe.cli",
            "server",
            "--address",
            "127.0.0.1:0",
            "--state",
            state,
            "--rounds",
            "100000",
            "--steps",
            "1",
            "--min-clients",
            str(n),
            "--routing",
            "turn",  # clients join with their routing statistics: this measures the round traffic
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        found = re.search(r"on port (\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError("the coordinator did not start")


def client_loop(
    port: int,
    features: tuple,
    stop: threading.Event,
    latencies: list[float],
    errors: list[str],
    accepted: list[int],
    heartbeats: list[float],
    joined: list[int],
    steady: threading.Event,
) -> None:
    """Join, then heartbeat; when told to train, pull and push a zero update (no local training:
    this measures the coordinator).
    """
    with connect(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)

        def timed(call):
            started = time.perf_counter()
            try:
                return call()
            finally:
                latencies.append(time.perf_counter() - started)

        try:
            retry = Retry(f"127.0.0.1:{port}", 30.0)
            session = timed(lambda: join(stub, PROFILES["fp32"], "load", features, None, retry, ENROLMENT))
            joined.append(1)
            while not stop.is_set():
                started = time.perf_counter()
                beat = timed(
                    lambda: stub.Heartbeat(
                        pb.HeartbeatRequest(client_id=session.client_id),
                        metadata=session.metadata,
                        timeout=30,
                    )
                )
                if steady.is_set():
                    heartbeats.append(time.perf_counter() - started)
                if beat.action != pb.HeartbeatReply.TRAIN:
                    time.sleep(0.05)
                    continue
                pull = functools.partial(pulled, stub, session.client_id, session.metadata)
                frames = timed(functools.partial(retry, pull, "pull"))
                a = frames[0].assignment
                delivered = decode_tensors((f.tensor for f in frames[1:]), 1 << 30)
                zeros = {n: quantize(torch.zeros(q.shape), q.bits) for n, q in delivered.items()}
                upload = Upload(Path.parse(a.path), variant_of(a.variant), a.round, a.seed, 1.0, zeros, 0.0)
                sent = list(push_frames(session, upload))  # one update id, however often retried
                push = functools.partial(resend, stub, sent, session.metadata)
                timed(functools.partial(retry, push, "push"))
                accepted.append(1)
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")


def pulled(stub: pb_grpc.CoordinatorStub, client_id: str, metadata: tuple) -> list:
    """The frames of one Pull."""
    return list(stub.Pull(pb.PullRequest(client_id=client_id), metadata=metadata, timeout=30))


def resend(stub: pb_grpc.CoordinatorStub, frames: list, metadata: tuple) -> pb.PushReply:
    """Push the same frames (the same update id) again."""
    return stub.Push(iter(frames), metadata=metadata, timeout=30)


def stalled_stream(port: int, features: tuple, stop: threading.Event, joined: list[int]) -> None:
    """A member that keeps one Push stream open sending nothing, reopening it whenever it is ended."""

    def silent():
        stop.wait()
        yield from ()

    with connect(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        session = join(
            stub, PROFILES["fp32"], "stalled", features, None, Retry(f"127.0.0.1:{port}"), ENROLMENT
        )
        joined.append(1)
        while not stop.is_set():
            try:
                stub.Push(silent(), metadata=session.metadata, timeout=120)
            except grpc.RpcError:
                stop.wait(0.2)  # refused (UNAVAILABLE) or ended by the coordinator's idle limit


def status_probe(port: int, stop: threading.Event, latencies: list[float], steady: threading.Event) -> None:
    """Once every member joined, ask for Status every 50 ms, recording how long each answer takes."""
    with connect(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        while not stop.wait(0.05):
            started = time.perf_counter()
            stub.Status(pb.StatusRequest(), timeout=30)
            if steady.is_set():
                latencies.append(time.perf_counter() - started)


def p99(values: list[float]) -> float:
    """The 99th percentile (nan for fewer than two values)."""
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


def run_level(n: int, seconds: float, stalled: int = 0) -> dict[str, float]:
    """Drive n clients for `seconds` (with `stalled` more members holding silent Push streams); return
    latency percentiles, heartbeat and Status p99, errors and accepted updates per second."""
    # every client reports the same routing statistics
    features = SPEC.feature_statistics(SPEC.data(0, 1).train)
    with tempfile.TemporaryDirectory() as state:
        proc, port = start_coordinator(n, state)
        latencies: list[float] = []
        heartbeats: list[float] = []
        statuses: list[float] = []
        errors: list[str] = []
        accepted: list[int] = []
        joined: list[int] = []
        stop, steady = threading.Event(), threading.Event()
        loop = (port, features, stop, latencies, errors, accepted, heartbeats, joined, steady)
        threads = [threading.Thread(target=client_loop, args=loop) for _ in range(n)]
        stall = (port, features, stop, joined)
        threads += [threading.Thread(target=stalled_stream, args=stall) for _ in range(stalled)]
        threads.append(threading.Thread(target=status_probe, args=(port, stop, statuses, steady)))
        try:
            started = time.perf_counter()
            for t in threads:
                t.start()
            while len(joined) < n + stalled and time.perf_counter() - started < 60:
                time.sleep(0.05)
            steady.set()  # heartbeat and Status latencies count from here: every member joined
            time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            elapsed = time.perf_counter() - started
        finally:
            proc.kill()
            proc.wait()
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "n": n,
        "stalled": stalled,
        "calls": len(latencies),
        "p50": cuts[49],
        "p99": cuts[98],
        "heartbeat_p99": p99(heartbeats),
        "status_p99": p99(statuses),
        "errors": len(errors),
        "updates_per_s": len(accepted) / elapsed,
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--stalled", type=int, nargs="*", default=[16, 64], help="silent Push streams")
    parser.add_argument("--stalled-clients", type=int, default=32, help="clients beside the stalled streams")
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration per level (bounded)")
    args = parser.parse_args()
    console = Console(width=140)
    table = Table(title=f"coordinator under load on loopback, {args.seconds:.0f} s per level")
    columns = ("clients", "stalled streams", "RPCs", "p50 ms", "p99 ms", "heartbeat p99", "Status p99")
    for column in (*columns, "errors", "updates/s"):
        table.add_column(column, justify="right")
    held = None
    levels = [(n, 0) for n in args.clients] + [(args.stalled_clients, s) for s in args.stalled]
    for n, stalled in levels:
        r = run_level(n, args.seconds, stalled)
        table.add_row(
            str(n),
            str(stalled),
            str(r["calls"]),
            f"{1000 * r['p50']:.1f}",
            f"{1000 * r['p99']:.1f}",
            f"{1000 * r['heartbeat_p99']:.1f}",
            f"{1000 * r['status_p99']:.1f}",
            str(r["errors"]),
            f"{r['updates_per_s']:.1f}",
        )
        if r["errors"] == 0 and r["p99"] < 1.0 and not stalled:
            held = n
        elif r["first_error"]:
            console.print(f"{n} clients: first error {r['first_error']}")
    console.print(table)
    console.print(f"largest N held with p99 < 1 s and no errors: {held if held is not None else 'none'}")


if __name__ == "__main__":
    main()
