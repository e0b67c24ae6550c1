"""The coordinator over gRPC: enrolment and authentication, bounded streams of tensors, health checking,
clustering messages.

The server is grpc.aio on an event loop of its own thread (`CoordinatorServer`): Pull and Push streams and
held heartbeats are coroutines, so that hundreds of clients streaming or waiting for a round take no thread
each; the coordinator's work runs on bounded thread pools (see `CoordinatorService`). Every call but Join
and Status carries a bearer token naming the member and its token epoch; a Push is authenticated from that
metadata before any of its messages is read, and its header is checked against what the coordinator expects
of that worker before its tensors are. Pull and Push streams are bounded in number
(`transport.max_streams`, the rest wait their turn, then are answered UNAVAILABLE) and in time
(`transport.stream_idle_s` without a message, `transport.stream_max_s` in all). A heartbeat with `wait_s` is
held until its member has something to do (`Coordinator.hold`). A message that does not parse is answered
INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import inspect
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path as FsPath
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.assignment import DeviceProfile
from fedmoe.clustering import MAX_MOMENT_VALUES
from fedmoe.config import InnerConfig
from fedmoe.engine import Assignment
from fedmoe.faults import crash_point
from fedmoe.modular import Path
from fedmoe.security import AuthError, TokenAuthority, bearer, enrolment_token, server_credentials
from fedmoe.server.coordinator import (
    MAX_HOLD_S,
    Coordinator,
    Proposal,
    Rejected,
    check_identifier,
    shown,
)
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.wire import CHUNK_BYTES, TensorReader, WireError, chunk_view, encode_tensors, frame_bytes
from fedmoe.worker import Job, Upload, Variant

log = logging.getLogger("fedmoe.server")
SERVICE = "fedmoe.v1.Coordinator"
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
STREAMS_PER_CLIENT = 2  # Pull and Push streams one client may hold open at once
PREEMPT_S = 2.0  # a stream silent this long gives its place to a new one when all are taken
LOOK_AGAIN_S = 0.25  # how often the first stream waiting for a place looks for a stalled one
PLACE_WAIT_S = 5.0  # how long a new stream waits for a place when all are taken by streams that move
SILENCED_S = 30.0  # how long a client whose stream was ended for its silence waits in no line for a place
MAX_FEATURES = 1 << 16  # routing features a client may report at join (paths in turn)
MAX_TEXT = 4096  # characters of an enrolment token
FULL_DISK = {errno.ENOSPC, errno.EDQUOT}  # a call that cannot write for these is answered UNAVAILABLE


def refusal(e: Exception) -> Rejected | None:
    """How a handler's exception is answered: a `Rejected` as it says; a full disk (`FULL_DISK`) UNAVAILABLE,
    so that the client keeps what it sent and sends it again with backoff while the operator frees space;
    None for anything else (UNKNOWN)."""
    if isinstance(e, OSError) and e.errno in FULL_DISK:
        return Rejected("UNAVAILABLE", f"the coordinator cannot store updates now: {e.strerror}")
    return e if isinstance(e, Rejected) else None


def refused(e: Rejected) -> tuple[grpc.StatusCode, str]:
    """The status a refusal ends its call with (the detail escaped and truncated), logged."""
    detail = shown(e.detail, 500)
    log.warning("rejected: %s %s", e.code, detail)
    return getattr(grpc.StatusCode, e.code), detail


class Malformed:
    """A request message that does not parse; the handler answers INVALID_ARGUMENT."""


MALFORMED = Malformed()


def parser(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns `MALFORMED` instead of raising (gRPC would answer INTERNAL and
    log a traceback)."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return parse


def frame_parser(message: Any) -> Callable[[bytes], Any]:
    """`parser` for a stream of frames: a chunk frame comes as a view of its data (`fedmoe.wire.chunk_view`,
    no parse and no copy), any other as a parsed message."""
    parse = parser(message)

    def parse_frame(data: bytes) -> Any:
        view = chunk_view(data)
        return parse(data) if view is None else view

    return parse_frame


@dataclass(eq=False)
class Stream:
    """A Pull or Push stream holding a place: whose, the task serving it, when it took the place and when it
    last moved a message."""

    client_id: str
    task: asyncio.Task
    opened: float
    active: float
    ended: str = ""  # why it was cancelled

    def touch(self) -> None:
        """A message moved."""
        self.active = time.monotonic()

    def stalled(self, now: float) -> bool:
        """Silent for `PREEMPT_S`."""
        return now - self.active >= PREEMPT_S

    def end(self, why: str) -> None:
        """Cancel its task; the stream's call ends CANCELLED with `why` (see `Streams.slot`)."""
        self.ended = why
        log.warning("stream of client %s ended: %s", self.client_id, why)
        self.task.cancel()


class Streams:
    """The Pull and Push streams of the event loop serving them: at most `STREAMS_PER_CLIENT` calls per client
    (`call`) and `limit` places (`slot`), which a stream takes once it has something to move (a Pull at once,
    a Push once its header arrived), so that a stream that sends nothing takes no place; a watchdog task
    (running while any place is held) ends a stream silent for `idle_s` or open for `max_s`. When all places
    are taken, a new stream takes the place of the one silent longest among those stalled (see
    `Stream.stalled`): a stalled stream holds a place only while nobody else needs it. Without a stalled
    one, it waits up to `PLACE_WAIT_S` for a place to free (in arrival order), then UNAVAILABLE: many
    clients pulling at a round's opening are served in turn instead of retrying with backoff. A client whose
    stream was ended for its silence in the last `SILENCED_S` waits in no line: refused at once when no place
    is free, its silent streams take no turns from the others."""

    def __init__(self, limit: int, idle_s: float, max_s: float):
        self.limit, self.idle_s, self.max_s = limit, idle_s, max_s
        self.freed = asyncio.Condition()  # a place was given back
        self.queue: list[object] = []  # the streams waiting for a place, in arrival order
        self.silenced: dict[str, float] = {}  # per client, when a stream of it was last ended for silence
        self.open: set[Stream] = set()
        self.calls: dict[str, int] = {}  # per client, its Pull and Push calls under way
        self.watchdog: asyncio.Task | None = None

    @asynccontextmanager
    async def call(self, client_id: str) -> AsyncIterator[None]:
        """Count a Pull or Push call of `client_id` while the block runs; UNAVAILABLE when it has
        `STREAMS_PER_CLIENT` under way."""
        if self.calls.get(client_id, 0) >= STREAMS_PER_CLIENT:
            raise Rejected("UNAVAILABLE", f"client {client_id} has {STREAMS_PER_CLIENT} streams open")
        self.calls[client_id] = self.calls.get(client_id, 0) + 1
        try:
            yield
        finally:
            self.calls[client_id] -= 1
            if not self.calls[client_id]:
                del self.calls[client_id]

    @asynccontextmanager
    async def slot(self, client_id: str) -> AsyncIterator[Stream]:
        """Hold a place for a stream of `client_id` (the current task, which moves a message at once) while
        the block runs; UNAVAILABLE when no place freed within `PLACE_WAIT_S`. A stream the watchdog or a
        newcomer ends raises CANCELLED with the reason."""
        now = time.monotonic()
        patient = now - self.silenced.get(client_id, -math.inf) > SILENCED_S
        until, ticket = now + (PLACE_WAIT_S if patient else 0.0), object()
        async with self.freed:
            self.queue.append(ticket)
            try:
                while len(self.open) >= self.limit:
                    self.preempt(now)
                    if len(self.open) < self.limit:
                        break
                    if now >= until:
                        raise Rejected(
                            "UNAVAILABLE", f"{len(self.open)} streams are open, the most served: retry"
                        )
                    # the first in line looks again as streams may stall; the others wait their turn
                    first = self.queue[0] is ticket
                    with suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.freed.wait(), min(until - now, LOOK_AGAIN_S) if first else until - now
                        )
                    now = time.monotonic()
            finally:
                self.queue.remove(ticket)
                if self.queue:
                    self.freed.notify()  # the next in line may be first now
        stream = Stream(client_id, asyncio.current_task(), now, now)
        self.open.add(stream)
        if self.watchdog is None:
            self.watchdog = asyncio.create_task(self.watch())
        try:
            yield stream
        except asyncio.CancelledError:
            if stream.ended:
                raise Rejected("CANCELLED", stream.ended) from None
            raise
        finally:
            self.open.discard(stream)
            async with self.freed:
                self.freed.notify()

    def preempt(self, now: float) -> None:
        """End the stalled stream silent longest, if any, to free its place."""
        stalled = [s for s in self.open if s.stalled(now)]
        if not stalled:
            return
        quiet = min(stalled, key=lambda s: s.active)
        self.open.discard(quiet)
        self.silence(quiet.client_id, now)
        quiet.end(f"silent for {now - quiet.active:.1f} s while another stream waited for its place")

    def silence(self, client_id: str, now: float) -> None:
        """A stream of `client_id` was ended for its silence at `now` (see `slot`)."""
        self.silenced = {c: t for c, t in self.silenced.items() if now - t <= SILENCED_S}
        self.silenced[client_id] = now

    async def watch(self) -> None:
        """End streams idle or open too long, until none is open."""
        period = min(1.0, self.idle_s / 4)
        while True:
            await asyncio.sleep(period)
            if not self.open:
                self.watchdog = None
                return
            now = time.monotonic()
            for s in [s for s in self.open if not s.ended]:
                if now - s.active > self.idle_s:
                    self.silence(s.client_id, now)
                    s.end(f"no message for {self.idle_s:g} s (transport.stream_idle_s)")
                elif now - s.opened > self.max_s:
                    s.end(f"open for more than {self.max_s:g} s (transport.stream_max_s)")


def assignment_message(assignment: Assignment, round: int, inner: InnerConfig) -> pb.Assignment:
    """The Assignment a member trains in `round`, with that round's inner settings."""
    v = assignment.variant
    return pb.Assignment(
        path=str(assignment.path),
        variant=pb.Variant(bits=v.bits, density=v.density, scheme=v.scheme),
        round=round,
        seed=assignment.seed,
        inner_steps=inner.steps,
        batch_size=inner.batch_size,
        lr=inner.lr,
        weight_decay=inner.weight_decay,
        grad_clip=inner.grad_clip,
    )


def proposal_message(proposal: Proposal) -> pb.ProposalReply:
    """A clustering proposal (or the converged clustering) as it travels: k x width centroids, row-major."""
    centroids = proposal.centroids
    if centroids is None:
        return pb.ProposalReply(pass_number=proposal.number, first=True, softness=proposal.softness)
    return pb.ProposalReply(
        pass_number=proposal.number,
        k=centroids.shape[0],
        width=centroids.shape[1],
        centroids=centroids.reshape(-1).tolist(),
        prices=np.asarray(proposal.prices, dtype=np.float64).tolist(),
        softness=proposal.softness,
        converged=proposal.converged,
        products=proposal.products,
    )


class CoordinatorService:
    """Join, Leave, Pull, Push, Heartbeat, Status, and routing by data's Proposal, Cluster and Assign, on top
    of a `Coordinator`. `enrolment` is the operator's enrolment token; `mutual_tls`: every connection carries
    a client certificate of the federation's CA, which enrols it.

    Join, Pull, Push and Heartbeat are coroutines of the server's event loop: a stream, a held heartbeat or a
    join waiting for the state's write holds no thread while it waits. Their steps that take the
    coordinator's lock (each holds it briefly) run on the loop itself: a hop to a thread and back would cost
    more than the step (threads taking turns at the lock and the GIL wait milliseconds for each
    acquisition). A push's chunks are hashed and written to its spool on `receiving` as they arrive, and
    storing a push (mostly waiting for the disk's flush) runs on `storing`, each at most `max_streams` at
    once; the state's writes, encoding a round's delivery and the other calls on `calls`
    (`transport.threads`). A handler refuses a call by raising `Rejected`.
    """

    def __init__(
        self, coordinator: Coordinator, tokens: TokenAuthority, enrolment: str, mutual_tls: bool = False
    ):
        self.coordinator, self.tokens = coordinator, tokens
        self.enrolment, self.mutual_tls = enrolment, mutual_tls
        transport = coordinator.config.transport
        self.max_update_bytes = transport.max_update_bytes
        self.streams = Streams(transport.max_streams, transport.stream_idle_s, transport.stream_max_s)
        self.calls = futures.ThreadPoolExecutor(transport.threads, thread_name_prefix="fedmoe-call")
        self.storing = futures.ThreadPoolExecutor(transport.max_streams, thread_name_prefix="fedmoe-store")
        self.receiving = futures.ThreadPoolExecutor(transport.max_streams, thread_name_prefix="fedmoe-push")
        self.model_json = json.dumps(coordinator.model)
        # this round's deliveries as they travel (serialized PullFrames), by the engine's shared tensors of
        # each (see Engine.job): encoded once, sent to every worker that receives them
        self.encoded: dict[int, tuple[int, dict, asyncio.Future]] = {}
        self.saving: asyncio.Future | None = None  # the state's write that joins wait for (see `saved`)

    @staticmethod
    async def run(pool: futures.Executor, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on a thread of `pool`, awaited."""
        return await asyncio.get_running_loop().run_in_executor(pool, partial(function, *args))

    def authenticate(self, metadata: Any, client_id: str = "") -> str:
        """The member whose current token the call's `metadata` carries (it must be `client_id` when one is
        named)."""
        token = bearer(metadata)
        if token is None:
            raise Rejected("UNAUTHENTICATED", "missing bearer token in the authorization metadata")
        try:
            owner = self.coordinator.authenticate(self.tokens.verify(token))
        except AuthError as e:
            raise Rejected("UNAUTHENTICATED", str(e)) from None
        if client_id and owner != client_id:
            raise Rejected("PERMISSION_DENIED", f"the token was issued to another client than {client_id}")
        return owner

    def enrolled(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> bool:
        """Whether the caller presented the enrolment credential: the operator's token, or (mutual TLS) a
        verified client certificate."""
        if self.mutual_tls and context.auth_context().get("x509_common_name"):
            return True
        given = request.enrolment.encode()
        return bool(given) and hmac.compare_digest(given, self.enrolment.encode())

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        if request.client_id:
            check_identifier("client_id", request.client_id)
            if request.proof:  # the pinned key proves who rejoins: no token needed
                self.coordinator.check_proof(request.client_id, request.proof, request.proof_time)
            else:
                self.authenticate(context.invocation_metadata(), request.client_id)
        if len(request.enrolment) > MAX_TEXT or len(request.feature_sum) > MAX_FEATURES:
            raise Rejected("INVALID_ARGUMENT", "an enrolment token or routing statistics far too long")
        p = request.profile
        try:
            profile = DeviceProfile(
                shown(p.name), p.memory_bytes, p.bits, tuple(p.densities) or (1.0,), p.speed or 1.0
            )
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", f"bad device profile: {e}") from None
        coordinator = self.coordinator
        member, version = coordinator.admit(
            profile,
            request.name,
            request.client_id,
            request.public_key,
            np.asarray(request.feature_sum, dtype=np.float64),
            request.examples,
            self.enrolled(request, context),
        )
        await self.saved(version)  # answered once the member is in the durable state
        reply = pb.JoinReply(
            client_id=member.client_id,
            token=self.tokens.issue(member.token_subject),
            model_json=self.model_json,
        )
        with coordinator.lock:
            assignment = coordinator.assignment(member.client_id)
            if assignment is not None:
                inner = coordinator.engine.inner(coordinator.round)
                reply.assignment.CopyFrom(assignment_message(assignment, coordinator.round, inner))
        return reply

    async def saved(self, version: int) -> None:
        """Return once state `version` (or a newer one) is on disk: one write at a time, on a thread, covers
        every change counted before it began, so that joins arriving together share it and wait for it
        holding no thread."""
        coordinator = self.coordinator
        while coordinator.saved_version < version:
            if self.saving is None or self.saving.done():  # the write covers every change counted so far
                self.saving = asyncio.ensure_future(self.run(self.calls, coordinator.wait_saved, version))
            await asyncio.shield(self.saving)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self.coordinator.leave(self.authenticate(context.invocation_metadata(), request.client_id))
        return pb.LeaveReply()

    async def Pull(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> None:
        client_id = self.authenticate(context.invocation_metadata(), request.client_id)
        job = self.coordinator.job(client_id, request.worker_id)
        assignment = Assignment(job.path, job.variant, job.seed)
        frames = [pb.PullFrame(assignment=assignment_message(assignment, job.round, job.inner))]
        async with self.streams.call(client_id):
            frames += await self.frames(job)  # before the stream takes a place: it holds one while it sends
            async with self.streams.slot(client_id) as stream:
                for frame in frames:
                    await context.write(frame)
                    stream.touch()

    async def frames(self, job: Job) -> list[bytes]:
        """A job's tensors as serialized Pull frames, encoded once per delivery and round (the engine shares
        one tensors dict among the workers that receive the same; the entry keeps it, so its id stays its
        own); pulls that ask while it is being encoded wait for it (a pull that ends meanwhile leaves the
        encoding to the others)."""
        key = id(job.tensors)
        entry = self.encoded.get(key)
        if entry is None or entry[1] is not job.tensors:
            self.encoded = {k: e for k, e in self.encoded.items() if e[0] == job.round}
            encoding = asyncio.ensure_future(self.run(self.calls, encoded_frames, job.tensors))
            entry = self.encoded[key] = (job.round, job.tensors, encoding)
        return await asyncio.shield(entry[2])

    async def Push(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext) -> pb.PushReply:
        # authenticated from the metadata, before any message is read
        client_id = self.authenticate(context.invocation_metadata())
        coordinator, spool = self.coordinator, None
        try:
            try:
                async with self.streams.call(client_id):
                    frames = aiter(request_iterator)
                    first = await self.header(frames, client_id)  # it takes a place once it has moved one
                    if first is MALFORMED:
                        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push frame that does not parse")
                    if not isinstance(first, pb.PushFrame) or first.WhichOneof("frame") != "header":
                        raise Rejected("INVALID_ARGUMENT", "a push starts with a PushHeader")
                    header = first.header
                    if header.client_id != client_id:
                        raise Rejected(
                            "PERMISSION_DENIED", f"the token was issued to {client_id}, not another"
                        )
                    worker_id = header.worker_id and check_identifier("worker_id", header.worker_id)
                    upload = header_upload(header)
                    expected = coordinator.expected_upload(upload, client_id, header.update_id, worker_id)
                    spool = coordinator.spool()  # the tensors go to disk as they arrive (small ones gathered)
                    reader = TensorReader(self.max_update_bytes, expected, spool)
                    async with self.streams.slot(client_id) as stream:
                        await self.receive(frames, reader, stream)
                    tensors = reader.tensors()
                    crash_point("push-read")  # read in full, nothing stored yet
            except asyncio.CancelledError:  # by the client, or the server stops
                log.info("push of client %s ended before its end", client_id)
                raise
            except WireError as e:
                raise Rejected(e.code.name, str(e)) from None
            except ValueError as e:
                raise Rejected("INVALID_ARGUMENT", str(e)) from None
            # its place went to the next stream: the update is checked and stored (mostly waiting for the
            # disk) on `storing`, at most `max_streams` at once, so that a burst of pushes does not crowd the
            # lock
            signed = replace(upload, tensors=tensors)
            open_round = await self.run(
                self.storing,
                coordinator.submit,
                signed,
                client_id,
                header.update_id,
                header.signature,
                worker_id,
                spool,
            )
            return pb.PushReply(accepted=True, round=open_round, detail="stored")
        finally:
            if spool is not None:
                spool.discard()  # a push refused or ended early; nothing once stored

    async def receive(self, frames: AsyncIterator, reader: TensorReader, stream: Stream) -> None:
        """Feed a push's frames to its reader as they arrive. A chunk that travels alone (a view of its
        message, of 64 KiB to 1 MiB) is hashed and written to the spool on `receiving` while the loop
        receives the next and serves other calls; smaller frames are fed on the loop (a hop costs more than
        they do)."""
        loop, feeding = asyncio.get_running_loop(), None
        try:
            async for frame in frames:
                stream.touch()
                frame = tensor_frame(frame)
                if feeding is not None:
                    await feeding
                    feeding = None
                if isinstance(frame, memoryview):
                    feeding = loop.run_in_executor(self.receiving, reader.feed, frame)
                else:
                    reader.feed(frame)
            if feeding is not None:
                await feeding
                feeding = None
        finally:
            if feeding is not None:  # the stream failed meanwhile: what the feed does no longer matters
                feeding.cancel()

    async def header(self, frames: AsyncIterator, client_id: str) -> Any:
        """A push's first message (None when it ended), awaited for `transport.stream_idle_s` at most."""
        try:
            return await asyncio.wait_for(anext(frames, None), self.streams.idle_s)
        except TimeoutError:
            self.streams.silence(client_id, time.monotonic())
            raise Rejected(
                "CANCELLED", f"no message for {self.streams.idle_s:g} s (transport.stream_idle_s)"
            ) from None

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        if not request.wait_s >= 0:  # NaN and negative waits
            raise Rejected("INVALID_ARGUMENT", f"wait_s is a number of seconds >= 0, got {request.wait_s}")
        coordinator, loop, woken = self.coordinator, asyncio.get_running_loop(), asyncio.Event()
        client_id = self.authenticate(context.invocation_metadata(), request.client_id)
        # answered by whichever thread changes the state
        waiter = coordinator.hold(client_id, request.wait_s, partial(loop.call_soon_threadsafe, woken.set))
        until = time.monotonic() + min(request.wait_s, MAX_HOLD_S)
        try:
            while waiter.answer is None and (now := time.monotonic()) < until:
                with suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(until, waiter.due) - now)
                if waiter.answer is None and time.monotonic() >= waiter.due:
                    coordinator.advance_due(waiter)
        finally:  # answered, the wait is over, or the call ended (cancelled, timed out, or the server stops)
            action, workers = coordinator.release(client_id, waiter)
        return pb.HeartbeatReply(
            action=getattr(pb.HeartbeatReply, action), round=coordinator.round, workers=workers
        )

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=json.dumps(self.coordinator.status()))

    def Proposal(self, request: pb.ProposalRequest, context: grpc.ServicerContext) -> pb.ProposalReply:
        client_id = self.authenticate(context.invocation_metadata(), request.client_id)
        return proposal_message(self.coordinator.proposal(client_id))

    def Cluster(self, request: pb.ClusterReport, context: grpc.ServicerContext) -> pb.ClusterReply:
        client_id = self.authenticate(context.invocation_metadata(), request.client_id)
        now = self.coordinator.cluster(
            client_id,
            request.pass_number,
            *(
                np.asarray(values, dtype=np.float64)
                for values in (
                    request.counts,
                    request.sums,
                    request.squares,
                    request.soft,
                    request.products[: MAX_MOMENT_VALUES + 1],  # more is refused by its length
                )
            ),
        )
        return pb.ClusterReply(pass_number=now.number, converged=now.converged)

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignReply:
        client_id = self.authenticate(context.invocation_metadata(), request.client_id)
        coordinator = self.coordinator
        workers = coordinator.assign(client_id, np.asarray(request.histogram, dtype=np.float64))
        with coordinator.lock:
            inner = coordinator.engine.inner(coordinator.round)
            return pb.AssignReply(
                workers=[
                    pb.Worker(
                        worker_id=worker_id,
                        assignment=assignment_message(a, coordinator.round, inner),
                        cluster=a.cluster,
                        examples=a.examples,
                        trains_router=a.trains_router,
                    )
                    for worker_id, a in workers.items()
                ],
                pending=not workers,
            )


def encoded_frames(tensors: dict) -> list[bytes]:
    """A delivery's tensors as serialized Pull frames."""
    return list(encode_tensors(tensors, into=pb.PullFrame, batch_bytes=CHUNK_BYTES, serialized=True))


def header_upload(header: pb.PushHeader) -> Upload:
    """The upload a push header describes, its tensors not read yet (ValueError for a bad path or variant)."""
    if len(header.path) > 64:
        raise ValueError("a path is at most 64 characters")
    v = header.variant
    variant = Variant(v.bits, round(v.density, 6), v.scheme[:64])
    evaluation = dict(header.evaluation)
    return Upload(
        Path.parse(header.path),
        variant,
        header.round,
        header.seed,
        header.weight,
        {},
        header.loss,
        evaluation,
    )


def tensor_frame(frame: pb.PushFrame | memoryview | Malformed) -> Any:
    """A push's frame after its header as a tensor frame (a chunk's data as a memoryview); INVALID_ARGUMENT
    for a frame that does not parse or a second header."""
    if isinstance(frame, memoryview):
        return frame
    if frame is MALFORMED:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push frame that does not parse")
    if frame.WhichOneof("frame") != "tensor":
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push carries exactly one PushHeader, first")
    return frame.tensor


def add_coordinator(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the service's methods (see `answering`), their requests parsed by `parser` (a stream's chunk
    frames by `frame_parser`), their replies serialized by `frame_bytes`."""
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        request = getattr(pb, method.input_type.name)
        behaviour = answering(getattr(service, method.name), method.input_type.name)
        parse = frame_parser(request) if method.client_streaming else parser(request)
        handlers[method.name] = makers[(method.client_streaming, method.server_streaming)](
            behaviour, request_deserializer=parse, response_serializer=frame_bytes
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def answering(behaviour: Callable, name: str) -> Callable:
    """`behaviour` (a function, run on the server's threads, or a coroutine, on its event loop, writing a
    stream's replies with `context.write`) answering INVALID_ARGUMENT for a request that did not parse, and a
    `Rejected` or a full disk as `refusal` says."""

    def check(request: Any) -> None:
        if request is MALFORMED:
            raise Rejected("INVALID_ARGUMENT", f"the request does not parse as a {name}")

    if inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check(request)
                return await behaviour(request, context)
            except (Rejected, OSError) as e:
                if (answer := refusal(e)) is None:
                    raise
                await context.abort(*refused(answer))

        return call

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            check(request)
            return behaviour(request, context)
        except (Rejected, OSError) as e:
            if (answer := refusal(e)) is None:
                raise
            context.abort(*refused(answer))

    return run


def listen(
    server: grpc.Server, address: str, certs: str | None, service: str, mutual_tls: bool = False
) -> int:
    """Add health checking (overall and for `service`), bind `address` (see `bind`), start; the port."""
    health_servicer = health.HealthServicer()
    for name in ("", service):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, address, certs, mutual_tls)
    server.start()
    return port


def bind(server: grpc.Server | grpc.aio.Server, address: str, certs: str | None, mutual_tls: bool) -> int:
    """Bind `address` (TLS with `certs`, requiring client certificates with `mutual_tls`); the port.

    `server` must be made with `server_options` (no port sharing): a port in use raises OSError
    "port N is in use".
    """
    try:
        if certs:
            port = server.add_secure_port(address, server_credentials(certs, mutual_tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(bind_error(address))
    return port


def server_options(*extra: tuple[str, int]) -> list[tuple[str, int]]:
    """gRPC server options without SO_REUSEPORT: a second server on a port in use fails, not shares it."""
    return [("grpc.so_reuseport", 0), *extra]


def bind_error(address: str) -> str:
    """Why `address` cannot be listened on, found by binding a plain socket to it."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as e:
        return f"cannot listen on {address}: {e} (give --address host:port)"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return f"port {port} is in use: stop the server listening there, or give another address"
                return f"cannot listen on {address}: {e.strerror}"
    return f"cannot listen on {address}"


class CoordinatorServer:
    """The coordinator's gRPC server (grpc.aio, with the standard health service) serving `service` on an
    event loop of a thread of its own; its `port`, and `stop` as a `grpc.Server`'s."""

    def __init__(
        self, service: CoordinatorService, address: str, certs: str | None, mutual_tls: bool
    ) -> None:
        self.service, self.stopped = service, None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.serve, name="fedmoe-grpc", daemon=True)
        self.thread.start()
        try:
            self.server, self.port = self.call(self.start(address, certs, mutual_tls))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    def serve(self) -> None:
        """The server thread: run the event loop until `stop`."""
        self.loop.run_forever()
        self.loop.close()

    def call(self, coroutine: Any) -> Any:
        """Run `coroutine` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def start(self, address: str, certs: str | None, mutual_tls: bool) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=self.service.calls, options=server_options(*MESSAGE_OPTIONS)
        )
        add_coordinator(self.service, server)
        health_servicer = health.aio.HealthServicer()
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = bind(server, address, certs, mutual_tls)
        await server.start()
        return server, port

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving: calls under way get `grace` seconds (None: none), then are cancelled. The event is
        set once the server stopped."""
        if self.stopped is None:
            self.stopped = threading.Event()
            asyncio.run_coroutine_threadsafe(self.shutdown(grace), self.loop)
        return self.stopped

    async def shutdown(self, grace: float | None) -> None:
        try:
            await self.server.stop(grace)
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for pool in (self.service.calls, self.service.storing, self.service.receiving):
                pool.shutdown(wait=False)
            self.loop.stop()
            self.stopped.set()


def start_server(
    coordinator: Coordinator, address: str | None = None, certs: str | None = None
) -> tuple[CoordinatorServer, int]:
    """Start the coordinator (and the standard health service) on `address` (default
    `transport.address`); returns the server and its port.

    With `certs` (default `transport.certs`: a directory made by `fedmoe certs`) the port speaks TLS, and
    with `transport.mutual_tls` it requires a client certificate of the same CA; otherwise it is plain text.
    Threads, stream bounds and the largest update come from the coordinator's `config.transport` (see
    `CoordinatorService`: streams and held heartbeats take no thread); the enrolment token from
    `fedmoe.security.enrolment_token(state_dir, certs)`. Raises OSError when the port is in use.
    """
    transport = coordinator.config.transport
    address, certs = address or transport.address, certs or transport.certs
    if transport.mutual_tls and not certs:
        raise ValueError("transport.mutual_tls needs TLS: give the certificates (--certs)")
    state_dir = FsPath(coordinator.state_dir)
    tokens = TokenAuthority.load_or_create(state_dir / "token.secret")
    enrolment = enrolment_token(state_dir, certs)
    service = CoordinatorService(coordinator, tokens, enrolment, transport.mutual_tls)
    server = CoordinatorServer(service, address, certs, transport.mutual_tls)
    log.info(
        "coordinator listening on %s (port %d, %s)", address, server.port, "TLS" if certs else "plain text"
    )
    return server, server.port
