"""Load benchmark on loopback: N concurrent clients heartbeat, pull and push small signed updates to a
coordinator running as its own process. A client with nothing to do waits in a held heartbeat (a
long-poll, `HeartbeatRequest.wait_s`) until the next round opens. For each N it prints RPC latency
percentiles (Join, Pull, Push, Status, heartbeats answered at once, and for a held heartbeat the time from
the round's opening to its answer, the opening taken as the start of the round's last push, or join: an
upper bound; a client's connection is set up before its first call and shown apart, as connect p99),
errors, accepted updates per second, the coordinator's peak memory (VmHWM) and the cores the coordinator
and the clients used, then the largest N held with p99 under 1 s and no errors. Each client
has a channel (a connection) of its own and sends the SDK's messages, as a coroutine over grpc.aio in one
of `--processes` processes: a load generator that costs the machine little beside the coordinator. Then,
with 32 clients, S more members each hold a Push stream open that sends nothing (reopening it whenever the
coordinator ends or refuses it), and the table shows heartbeat and Status latencies under that stall.

    python bench/load.py                      # N = 8, 32, 128, 256, 512; then S = 16, 64 stalled streams
    python bench/load.py --clients 16 64 --stalled 16 --seconds 10
    python bench/load.py --clients 512 --stalled --train-s 20   # pushes spread over local training
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import grpc
import torch
from rich.console import Console
from rich.table import Table

from fedmoe.assignment import PROFILES
from fedmoe.clients.runtime import Retry, connect, join, join_request, push_frames, session_of, variant_of
from fedmoe.compress.quant import quantize
from fedmoe.config import DEFAULT_SPEC
from fedmoe.modular import Path
from fedmoe.security import ENROLMENT_ENV, new_signing_key
from fedmoe.spec import load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors
from fedmoe.worker import Upload

SPEC = load_spec(DEFAULT_SPEC)
HOLD_S = 10.0  # how long a client asks the coordinator to hold its heartbeat while there is nothing to do
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


@dataclass
class Level:
    """What the threads of one level record."""

    latencies: list[float] = field(default_factory=list)  # every RPC's, as a client waits for it
    kinds: dict[str, list[float]] = field(default_factory=dict)  # the same by call: join, pull, push
    heartbeats: list[float] = field(default_factory=list)  # heartbeats', once every member joined
    statuses: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    joined: list[int] = field(default_factory=list)
    pushed: dict[int, float] = field(default_factory=dict)  # per round, when its last push started
    # (round -1: the last join)
    stop: threading.Event = field(default_factory=threading.Event)
    steady: threading.Event = field(default_factory=threading.Event)  # every member joined

    def pushing(self, round: int, now: float) -> None:
        """A push for `round` starts at `now`."""
        self.pushed[round] = max(now, self.pushed.get(round, now))


async def client_loop(port: int, features: tuple, level: Level, train_s: float, seed: int) -> None:
    """One client, a coroutine on its own channel (its own connection, as a client on its own machine has):
    join, then heartbeat (held while there is nothing to do); when told to train, pull, wait as long as local
    training would take (`train_s` x a uniform 0.5 to 1.5; 0: no wait, every client pushes at once), and
    push a zero update (no training is done: this measures the coordinator). The SDK's messages, sent over
    grpc.aio, so that hundreds of clients cost the machine little beside the coordinator.
    """
    rng = random.Random(seed)
    latencies = level.latencies
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)

        async def timed(call, kind):
            nonlocal calling
            calling, started = kind, time.perf_counter()
            try:
                return await retried(call)
            finally:
                latencies.append(time.perf_counter() - started)
                level.kinds.setdefault(kind, []).append(latencies[-1])

        calling = "connect"  # the call under way, named in an error
        try:
            started = time.perf_counter()  # the connection is set up apart from the first call
            await asyncio.wait_for(channel.channel_ready(), 30)
            level.kinds.setdefault("connect", []).append(time.perf_counter() - started)
            level.pushing(-1, time.perf_counter())  # round 0 opens once the last member joined
            key = new_signing_key()
            request, _ = join_request(PROFILES["fp32"], "load", features, key, enrolment=ENROLMENT)
            session = session_of(await timed(lambda: stub.Join(request, timeout=30), "join"), key)
            level.joined.append(1)
            beat = pb.HeartbeatRequest(client_id=session.client_id, wait_s=HOLD_S)
            while not level.stop.is_set():
                calling, started = "heartbeat", time.perf_counter()
                reply = await stub.Heartbeat(beat, metadata=session.metadata, timeout=30 + HOLD_S)
                answered = time.perf_counter()
                train = reply.action == pb.HeartbeatReply.TRAIN
                # held until the round opened: counted from the start of the push that closed the previous
                # round (the last one to start; an upper bound); a WAIT comes at once, or once the hold ends
                opened = level.pushed.get(reply.round - 1, started) if train else started
                waited = answered - max(started, opened)
                if train or waited < HOLD_S / 2:
                    latencies.append(waited)
                    if level.steady.is_set():
                        level.heartbeats.append(waited)
                if not train:
                    await asyncio.sleep(0.05)
                    continue
                pull = pb.PullRequest(client_id=session.client_id)
                frames = await timed(functools.partial(pulled, stub, pull, session.metadata), "pull")
                await asyncio.sleep(train_s * rng.uniform(0.5, 1.5))
                if level.stop.is_set():
                    break
                a = frames[0].assignment
                delivered = decode_tensors((f.tensor for f in frames[1:]), 1 << 30)
                zeros = {n: quantize(torch.zeros(q.shape), q.bits) for n, q in delivered.items()}
                upload = Upload(Path.parse(a.path), variant_of(a.variant), a.round, a.seed, 1.0, zeros, 0.0)
                sent = list(push_frames(session, upload))  # one update id, however often retried
                level.pushing(a.round, time.perf_counter())
                await timed(functools.partial(resend, stub, sent, session.metadata), "push")
                level.accepted.append(1)
        except grpc.aio.AioRpcError as e:
            when = " (after the level's end)" if level.stop.is_set() else ""
            level.errors.append(f"{calling}{when}: {e.code().name}: {e.details()}")
        except TimeoutError:
            level.errors.append("the connection was not set up within 30 s")


async def retried(call):
    """Await `call()`, again with backoff while the coordinator answers UNAVAILABLE (for up to 30 s)."""
    delay, until = 0.05, time.monotonic() + 30
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > until:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


async def resend(stub: pb_grpc.CoordinatorStub, frames: list, metadata: tuple) -> pb.PushReply:
    """Push the same frames (the same update id) again."""
    return await stub.Push(iter(frames), metadata=metadata, timeout=30)


async def pulled(stub: pb_grpc.CoordinatorStub, request: pb.PullRequest, metadata: tuple) -> list:
    """The frames of one Pull."""
    return [frame async for frame in stub.Pull(request, metadata=metadata, timeout=30)]


def stalled_stream(port: int, features: tuple, level: Level) -> None:
    """A member that keeps one Push stream open sending nothing, reopening it whenever it is ended; and
    meanwhile, once every member joined, heartbeats every 50 ms without being held, recording how long
    each answer takes."""

    def silent():
        level.stop.wait()
        yield from ()

    def beating() -> None:
        request = pb.HeartbeatRequest(client_id=session.client_id)
        while not level.stop.wait(0.05):
            started = time.perf_counter()
            stub.Heartbeat(request, metadata=session.metadata, timeout=30)
            if level.steady.is_set():
                level.heartbeats.append(time.perf_counter() - started)

    with connect(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        session = join(
            stub, PROFILES["fp32"], "stalled", features, None, Retry(f"127.0.0.1:{port}"), ENROLMENT
        )
        level.joined.append(1)
        beats = threading.Thread(target=beating)
        beats.start()
        while not level.stop.is_set():
            try:
                stub.Push(silent(), metadata=session.metadata, timeout=120)
            except grpc.RpcError:
                level.stop.wait(0.2)  # refused (UNAVAILABLE) or ended by the coordinator's idle limit
        beats.join()


def status_probe(port: int, level: Level) -> None:
    """Once every member joined, ask for Status every 50 ms, recording how long each answer takes."""
    with connect(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        while not level.stop.wait(0.05):
            started = time.perf_counter()
            stub.Status(pb.StatusRequest(), timeout=30)
            if level.steady.is_set():
                level.statuses.append(time.perf_counter() - started)


def p99(values: list[float]) -> float:
    """The 99th percentile (nan for fewer than two values)."""
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process `pid` has used (its threads included)."""
    fields = FsPath(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    """Process `pid`'s peak resident memory (VmHWM), bytes."""
    found = re.search(r"VmHWM:\s+(\d+) kB", FsPath(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) * 1024


def client_process(
    port: int, features: tuple, share: range, train_s: float, signals: tuple, results: mp.Queue
) -> None:
    """Clients `share` as coroutines of one event loop in this process, until `signals` (joined count,
    steady, stop) says stop; then what they recorded, and this process's CPU seconds, go on `results`."""
    joined, steady, stop = signals
    level, cpu = Level(), time.process_time()

    async def clients() -> None:
        tasks = [asyncio.create_task(client_loop(port, features, level, train_s, i)) for i in share]
        counted = 0
        while not stop.is_set():
            await asyncio.sleep(0.05)
            with joined.get_lock():
                joined.value += len(level.joined) - counted
            counted = len(level.joined)
            if steady.is_set():
                level.steady.set()
        level.stop.set()
        await asyncio.wait(tasks, timeout=HOLD_S + 5)
        for task in tasks:
            task.cancel()

    asyncio.run(clients())
    recorded = (level.latencies, level.kinds, level.heartbeats, level.errors, len(level.accepted))
    results.put((*recorded, time.process_time() - cpu))


def run_level(
    n: int, seconds: float, stalled: int = 0, train_s: float = 0.0, processes: int = 1
) -> dict[str, float]:
    """Drive n clients (coroutines of `processes` processes) for `seconds` (with `stalled` more members
    holding silent Push streams); return latency percentiles, heartbeat and Status p99, errors, accepted
    updates per second, the coordinator's peak memory and the cores the coordinator and the clients used."""
    # every client reports the same routing statistics
    features = SPEC.feature_statistics(SPEC.data(0, 1).train)
    level = Level()
    spawn = mp.get_context("spawn")  # no gRPC state crosses a fork
    signals = (spawn.Value("i", 0), spawn.Event(), spawn.Event())
    joined, steady, stop = signals
    results = spawn.Queue()
    with tempfile.TemporaryDirectory() as state:
        proc, port = start_coordinator(n, state)
        shares = [range(i, n, processes) for i in range(min(processes, n))]
        workers = [
            spawn.Process(target=client_process, args=(port, features, share, train_s, signals, results))
            for share in shares
        ]
        threads = [
            threading.Thread(target=stalled_stream, args=(port, features, level)) for _ in range(stalled)
        ]
        threads.append(threading.Thread(target=status_probe, args=(port, level)))
        try:
            started, ours, theirs = time.perf_counter(), time.process_time(), cpu_seconds(proc.pid)
            for worker in workers:
                worker.start()
            for t in threads:
                t.start()
            while joined.value + len(level.joined) < n + stalled and time.perf_counter() - started < 120:
                time.sleep(0.05)
            steady.set()  # heartbeat and Status latencies count from here: every member joined
            level.steady.set()
            time.sleep(seconds)
            stop.set()
            level.stop.set()
            recorded = [results.get(timeout=120) for _ in workers]
            for t in threads:
                t.join(timeout=60)
            for worker in workers:
                worker.join(timeout=60)
            elapsed = time.perf_counter() - started
            ours, theirs = time.process_time() - ours, cpu_seconds(proc.pid) - theirs
            memory = peak_rss(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    accepted = 0
    for latencies, kinds, heartbeats, errors, their_accepted, cpu in recorded:
        level.latencies += latencies
        for kind, values in kinds.items():
            level.kinds.setdefault(kind, []).extend(values)
        level.heartbeats += heartbeats
        level.errors += errors
        accepted += their_accepted
        ours += cpu
    latencies = level.latencies + level.statuses
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "n": n,
        "stalled": stalled,
        "calls": len(latencies),
        "p50": cuts[49],
        "p99": cuts[98],
        "connect_p99": p99(level.kinds.get("connect", [])),
        "join_p99": p99(level.kinds.get("join", [])),
        "pull_p99": p99(level.kinds.get("pull", [])),
        "push_p99": p99(level.kinds.get("push", [])),
        "heartbeat_p99": p99(level.heartbeats),
        "status_p99": p99(level.statuses),
        "errors": len(level.errors),
        "updates_per_s": accepted / elapsed,
        "peak_rss": memory,
        "coordinator_cores": theirs / elapsed,
        "client_cores": ours / elapsed,
        "first_error": level.errors[0] if level.errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="*", default=[8, 32, 128, 256, 512])
    parser.add_argument("--stalled", type=int, nargs="*", default=[16, 64], help="silent Push streams")
    parser.add_argument("--stalled-clients", type=int, default=32, help="clients beside the stalled streams")
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration per level (bounded)")
    parser.add_argument(
        "--train-s", type=float, default=0.0, help="local training time per round (x 0.5 to 1.5 per client)"
    )
    parser.add_argument("--processes", type=int, default=2, help="processes the clients run in")
    args = parser.parse_args()
    console = Console(width=180)
    training = f"local training {args.train_s:g} s x 0.5-1.5" if args.train_s else "no local training"
    table = Table(title=f"coordinator under load on loopback, {args.seconds:.0f} s per level, {training}")
    columns = ("clients", "stalled streams", "RPCs", "p50 ms", "p99 ms", "connect p99", "Join p99")
    columns += ("Pull p99", "Push p99", "heartbeat p99", "Status p99")
    more = ("errors", "updates/s", "coordinator peak RSS MiB", "coordinator cores", "client cores")
    for column in (*columns, *more):
        table.add_column(column, justify="right")
    held = None
    levels = [(n, 0) for n in args.clients] + [(args.stalled_clients, s) for s in args.stalled]
    for n, stalled in levels:
        r = run_level(n, args.seconds, stalled, args.train_s, args.processes)
        table.add_row(
            str(n),
            str(stalled),
            str(r["calls"]),
            f"{1000 * r['p50']:.1f}",
            f"{1000 * r['p99']:.1f}",
            f"{1000 * r['connect_p99']:.1f}",
            f"{1000 * r['join_p99']:.1f}",
            f"{1000 * r['pull_p99']:.1f}",
            f"{1000 * r['push_p99']:.1f}",
            f"{1000 * r['heartbeat_p99']:.1f}",
            f"{1000 * r['status_p99']:.1f}",
            str(r["errors"]),
            f"{r['updates_per_s']:.1f}",
            f"{r['peak_rss'] / (1 << 20):.0f}",
            f"{r['coordinator_cores']:.2f}",
            f"{r['client_cores']:.2f}",
        )
        if r["errors"] == 0 and r["p99"] < 1.0 and not stalled:
            held = n
        elif r["first_error"]:
            console.print(f"{n} clients: first error {r['first_error']}")
    console.print(table)
    console.print(f"largest N held with p99 < 1 s and no errors: {held if held is not None else 'none'}")
    console.print(
        f"on {os.cpu_count()} cores, shared by the coordinator and the clients ({args.processes} "
        "processes; cores: CPU s / s)"
    )


if __name__ == "__main__":
    main()
