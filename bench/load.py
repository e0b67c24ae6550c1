"""Load benchmark on loopback: N concurrent clients heartbeat, pull and push small signed updates to a
coordinator running as its own process. For each N it prints RPC latency percentiles, errors and
accepted updates per second, then the largest N held with p99 under 1 s and no errors.

    python bench/load.py                      # N = 8, 32, 64, 128, 256
    python bench/load.py --clients 16 64 --seconds 10
"""

from __future__ import annotations

import argparse
import functools
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
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors
from fedmoe.worker import Upload

SPEC = load_spec(DEFAULT_SPEC)


def start_coordinator(n: int, state: str) -> tuple[subprocess.Popen, int]:
    """A `fedmoe server` process whose rounds close when all n clients pushed."""
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
            session = timed(
                lambda: join(stub, PROFILES["fp32"], "load", features, retry=Retry(f"127.0.0.1:{port}", 30.0))
            )
            while not stop.is_set():
                beat = timed(
                    lambda: stub.Heartbeat(
                        pb.HeartbeatRequest(client_id=session.client_id),
                        metadata=session.metadata,
                        timeout=30,
                    )
                )
                if beat.action != pb.HeartbeatReply.TRAIN:
                    time.sleep(0.05)
                    continue
                frames = timed(
                    lambda: list(
                        stub.Pull(
                            pb.PullRequest(client_id=session.client_id), metadata=session.metadata, timeout=30
                        )
                    )
                )
                a = frames[0].assignment
                delivered = decode_tensors((f.tensor for f in frames[1:]), 1 << 30)
                zeros = {n: quantize(torch.zeros(q.shape), q.bits) for n, q in delivered.items()}
                upload = Upload(Path.parse(a.path), variant_of(a.variant), a.round, a.seed, 1.0, zeros, 0.0)
                timed(
                    functools.partial(
                        stub.Push, push_frames(session, upload), metadata=session.metadata, timeout=30
                    )
                )
                accepted.append(1)
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")


def run_level(n: int, seconds: float) -> dict[str, float]:
    """Drive n clients for `seconds`; return latency percentiles, errors and accepted updates per second."""
    # every client reports the same routing statistics
    features = SPEC.feature_statistics(SPEC.data(0, 1).train)
    with tempfile.TemporaryDirectory() as state:
        proc, port = start_coordinator(n, state)
        latencies: list[float] = []
        errors: list[str] = []
        accepted: list[int] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(port, features, stop, latencies, errors, accepted))
            for _ in range(n)
        ]
        try:
            started = time.perf_counter()
            for t in threads:
                t.start()
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
        "calls": len(latencies),
        "p50": cuts[49],
        "p99": cuts[98],
        "errors": len(errors),
        "updates_per_s": len(accepted) / elapsed,
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration per level (bounded)")
    args = parser.parse_args()
    console = Console(width=140)
    table = Table(title=f"coordinator under load on loopback, {args.seconds:.0f} s per level")
    for column in ("clients", "RPCs", "p50 ms", "p99 ms", "errors", "updates/s"):
        table.add_column(column, justify="right")
    held = None
    for n in args.clients:
        r = run_level(n, args.seconds)
        table.add_row(
            str(n),
            str(r["calls"]),
            f"{1000 * r['p50']:.1f}",
            f"{1000 * r['p99']:.1f}",
            str(r["errors"]),
            f"{r['updates_per_s']:.1f}",
        )
        if r["errors"] == 0 and r["p99"] < 1.0:
            held = n
        elif r["first_error"]:
            console.print(f"{n} clients: first error {r['first_error']}")
    console.print(table)
    console.print(f"largest N held with p99 < 1 s and no errors: {held if held is not None else 'none'}")


if __name__ == "__main__":
    main()
