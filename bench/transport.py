"""Transport benchmark on loopback: Pull and Push of a 100 MB module next to a raw gRPC byte stream of the
same size, in the same run, taking turns (raw, Pull, Push, again), so that the ratio of each turn is the
figure and a machine whose speed drifts weighs on all three alike; and the coordinator's aggregation of one
round of 16 updates of 10M parameters.

Beside the raw stream, two bare gRPC receivers show what this machine leaves for the work Pull and Push
must do: one hashes what it receives (BLAKE3) and copies it into place as it arrives, as a checked receipt
must; one writes it to a file as it arrives (fedmoe's `Spool`, nothing else of fedmoe) and flushes the
file before answering, as a durable one must. The servers run in processes of their own, as on another
machine: the raw receivers, and the coordinator (its state on disk, every push durable before it is
acknowledged). Each turn a new member joins, pulls its path and pushes it back as its update (a member
pushes once a round); the round stays open. The delivery is encoded once a round: a first pull, not timed,
encodes it.

    python bench/transport.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
import uuid
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path as FsPath

import blake3
import grpc
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedmoe.aggregate import aggregate
from fedmoe.assignment import PROFILES
from fedmoe.checkpoint import Spool
from fedmoe.clients.runtime import StreamingStub, connect, join, pull_job, push
from fedmoe.compress.quant import QTensor, quantize
from fedmoe.config import Config
from fedmoe.models.classifier import mlp_levels
from fedmoe.modular import Path
from fedmoe.security import enrolment_token
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.service import start_server
from fedmoe.spec import Examples, Spec
from fedmoe.wire import CHUNK_BYTES
from fedmoe.worker import Upload, Variant

REPEATS = 5


def raw_receiver(scratch: str, conn: Connection) -> None:
    """Serve bare gRPC stream-unary calls that take a stream of bytes and answer its length: `Send` only
    counts them; `Checked` also hashes them (BLAKE3) and copies each into place as it arrives (the stream's
    size comes in the metadata, as a tensor's in its header); `Durable` writes them to a file in `scratch`
    as they arrive (a `Spool`: the disk asked to start writing as they come) and flushes it before
    answering. Sends the port on `conn`, stops when it says so."""

    def send(request_iterator, context):
        return sum(len(m) for m in request_iterator).to_bytes(8, "little")

    def checked(request_iterator, context):
        digest, at = blake3.blake3(), 0
        buffer = np.empty(int(dict(context.invocation_metadata())["size"]), dtype=np.uint8)
        for message in request_iterator:
            digest.update(message)
            buffer[at : at + len(message)] = np.frombuffer(message, dtype=np.uint8)
            at += len(message)
        return at.to_bytes(8, "little")

    def durable(request_iterator, context):
        spool, size = Spool(scratch), 0
        for message in request_iterator:
            spool.write(message)
            size += len(message)
        spool.commit(FsPath(scratch) / f"durable-{uuid.uuid4().hex}.bin")  # fsynced, then renamed
        return size.to_bytes(8, "little")

    methods = {"Send": send, "Checked": checked, "Durable": durable}
    handler = grpc.method_handlers_generic_handler(
        "raw.Bytes", {name: grpc.stream_unary_rpc_method_handler(m) for name, m in methods.items()}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    conn.recv()
    server.stop(0)


def raw_stream_seconds(port: int, size: int, method: str = "Send") -> float:
    """Seconds to send `size` bytes in 1 MiB messages through the raw receiver's `method`."""
    chunk = bytes(CHUNK_BYTES)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        send = channel.stream_unary(f"/raw.Bytes/{method}")
        started = time.perf_counter()
        sent = size // CHUNK_BYTES * CHUNK_BYTES
        got = int.from_bytes(
            send(iter([chunk] * (size // CHUNK_BYTES)), metadata=(("size", str(sent)),)), "little"
        )
        elapsed = time.perf_counter() - started
    assert got == sent
    return elapsed


def mlp_spec(hidden: int, depth: int) -> Spec:
    """A digits-shaped MLP of the given width and depth (64 inputs, 10 classes)."""
    return Spec(f"mlp-{hidden}x{depth}", mlp_levels(in_dim=64, hidden=hidden, depth=depth, classes=10))


def coordinator_process(state: str, members: int, conn: Connection) -> None:
    """Serve a coordinator of a ~100 MB path whose round waits for `members`; send its port and the
    module's bytes on `conn`, stop when it says so."""
    # paths in turn: the bench's clients join with routing statistics
    config = Config(
        grid=(1,), rounds=1, inner={"steps": 1}, policy={"min_clients": members}, routing={"assign": "turn"}
    )
    coordinator = Coordinator(config, state, spec=mlp_spec(3500, 3))
    server, port = start_server(coordinator, "127.0.0.1:0")
    conn.send((port, 4 * sum(p.numel() for p in coordinator.engine.model.parameters())))
    conn.recv()
    server.stop(0).wait()


def turns() -> tuple[int, list[tuple[float, ...]]]:
    """Module bytes, and per turn seconds of the raw stream, its two floors (see `raw_receiver`), Pull and
    Push of a ~100 MB path through the coordinator."""
    spec = mlp_spec(3500, 3)
    features = spec.feature_statistics(Examples(torch.rand(16, 64), torch.zeros(16, dtype=torch.int64)))
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as state:
        raw_end, raw_child = spawn.Pipe()
        coordinator_end, coordinator_child = spawn.Pipe()
        servers = [
            spawn.Process(target=raw_receiver, args=(state, raw_child)),
            spawn.Process(target=coordinator_process, args=(state, REPEATS + 2, coordinator_child)),
        ]
        for server in servers:
            server.start()
        try:
            raw_port = raw_end.recv()
            port, size = coordinator_end.recv()
            with connect(f"127.0.0.1:{port}") as channel:
                stub = StreamingStub(channel)
                enrolment = enrolment_token(state)
                pull_job(stub, join(stub, PROFILES["fp32"], "first", features, enrolment=enrolment))
                timed = []
                for i in range(REPEATS):
                    session = join(stub, PROFILES["fp32"], f"bench{i}", features, enrolment=enrolment)
                    raw = [raw_stream_seconds(raw_port, size, m) for m in ("Send", "Checked", "Durable")]
                    started = time.perf_counter()
                    job = pull_job(stub, session)
                    pulled = time.perf_counter() - started
                    # new QTensors, which the client hashes to sign them, as it does a trained update
                    tensors = {
                        n: QTensor(q.bits, q.shape, q.payload, q.scales) for n, q in job.tensors.items()
                    }
                    upload = Upload(job.path, Variant(), 0, session.assignment.seed, 1.0, tensors, 0.0)
                    started = time.perf_counter()
                    push(stub, session, upload, "")  # as clients push: frames sent as they travel
                    timed.append((*raw, pulled, time.perf_counter() - started))
        finally:
            for end in (raw_end, coordinator_end):
                end.send("stop")
            for server in servers:
                server.join(30)
    return size, timed


def aggregation_seconds(bits: int, n_updates: int = 16) -> float:
    """Seconds for the coordinator to decode and average one round of n updates of a 10M-parameter path."""
    model = mlp_spec(3150, 2).build((1,))  # about 10M parameters
    path = Path((0,))
    params = dict(model.compose(path).named_parameters())
    generator = torch.Generator().manual_seed(0)
    uploads = [
        Upload(
            path,
            Variant(bits),
            0,
            0,
            1.0,
            {n: quantize(torch.randn(p.shape, generator=generator) * 1e-3, bits) for n, p in params.items()},
            0.0,
        )
        for _ in range(n_updates)
    ]
    started = time.perf_counter()
    aggregate(model, uploads)
    return time.perf_counter() - started


def main() -> None:
    console = Console(width=140)
    size, timed = turns()
    mb, median = size / 1e6, statistics.median
    table = Table(title=f"loopback transport of a {mb:.0f} MB module (median of {REPEATS} turns)")
    for column in ("what", "seconds", "MB/s", "ratio to raw gRPC (per turn: median, range)"):
        table.add_column(column, justify="left" if column == "what" else "right")
    names = (
        "raw gRPC byte stream",
        "  bare receiver: checksum + copy into place",
        "  bare receiver: written to disk as it arrives + flush",
        "Pull (stream + checksum + decode)",
        "Push (sign + stream + checksum + checks + durable write)",
    )
    for i, name in enumerate(names):
        seconds = median(t[i] for t in timed)
        ratios = [t[0] / t[i] for t in timed]
        spread = f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        table.add_row(name, f"{seconds:.2f}", f"{mb / seconds:.0f}", spread)
    console.print(table)
    n_params = sum(p.numel() for p in mlp_spec(3150, 2).build((1,)).parameters())
    agg = Table(title=f"aggregation of one round: 16 updates of {n_params / 1e6:.1f}M parameters")
    agg.add_column("update bits")
    agg.add_column("seconds", justify="right")
    for bits in (32, 8, 4):
        agg.add_row(str(bits), f"{aggregation_seconds(bits):.2f}")
    console.print(agg)


if __name__ == "__main__":
    main()
