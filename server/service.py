"""The coordinator over gRPC: enrolment and authentication, bounded streams of tensors, health checking,
clustering messages.

Every call but Join and Status carries a bearer token naming the member and its token epoch; a Push is
authenticated from that metadata before any of its messages is read, and its header is checked against
what the coordinator expects of that worker before its tensors are. Pull and Push streams are bounded in
number (`transport.max_streams`, the rest wait their turn, then are answered UNAVAILABLE) and in time
(`transport.stream_idle_s` without a message, `transport.stream_max_s` in all), so stalled streams never take
the threads that serve heartbeats and status. A heartbeat with `wait_s` is held until its member has
something to do (`Coordinator.held_action`), on a thread of its own. A message that does not parse is
answered INVALID_ARGUMENT.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path as FsPath
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.assignment import DeviceProfile
from fedmoe.clustering import MAX_MOMENT_VALUES
from fedmoe.compress.quant import wire_bytes
from fedmoe.config import InnerConfig
from fedmoe.engine import Assignment
from fedmoe.faults import crash_point
from fedmoe.modular import Path
from fedmoe.security import AuthError, TokenAuthority, bearer, enrolment_token, server_credentials
from fedmoe.server.coordinator import Coordinator, Proposal, Rejected, check_identifier, shown
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.wire import (
    CHUNK_BYTES,
    WireError,
    chunk_view,
    decode_tensors,
    encode_tensors,
    frame_bytes,
    read_ahead,
)
from fedmoe.worker import Job, Upload, Variant

log = logging.getLogger("fedmoe.server")
SERVICE = "fedmoe.v1.Coordinator"
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
STREAMS_PER_CLIENT = 2  # Pull and Push streams one client may hold open at once
PREEMPT_S = 2.0  # a stream silent this long gives its place to a new one when all are taken
FIRST_MESSAGE_S = 0.25  # and so does one that moved no message this long after it opened
PLACE_WAIT_S = 5.0  # how long a new stream waits for a place when all are taken by streams that move
SILENCED_S = 30.0  # how long a client whose stream was ended for its silence waits in no line for a place
MAX_FEATURES = 1 << 16  # routing features a client may report at join (paths in turn)
MAX_TEXT = 4096  # characters of an enrolment token
READ_AHEAD_BYTES = 8 << 20  # a push of this many bytes is received on a thread of its own (`read_ahead`)


def abort(context: grpc.ServicerContext, code: str, detail: str) -> None:
    """End the call with a precise status (the detail escaped and truncated); the coordinator's state is
    unchanged."""
    detail = shown(detail, 500)
    log.warning("rejected: %s %s", code, detail)
    context.abort(getattr(grpc.StatusCode, code), detail)


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
    """An open Pull or Push stream: whose, its call, when it opened and when it last moved a message."""

    client_id: str
    context: grpc.ServicerContext
    opened: float
    active: float
    moved: bool = False  # a message moved since it opened
    ended: str = ""  # why it was cancelled

    def touch(self) -> None:
        """A message moved."""
        self.active, self.moved = time.monotonic(), True

    def stalled(self, now: float) -> bool:
        """Silent for `PREEMPT_S`, or moved nothing in its first `FIRST_MESSAGE_S` (a client sends its
        first message at once)."""
        return now - self.active >= PREEMPT_S or (not self.moved and now - self.opened >= FIRST_MESSAGE_S)


class Streams:
    """The open Pull and Push streams: at most `limit` at once and `STREAMS_PER_CLIENT` per client; a
    watchdog thread (running while any is open) cancels one silent for `idle_s` or open for `max_s`. When
    all places are taken, a new stream takes the place of the one silent longest among those stalled (see
    `Stream.stalled`): a stalled stream holds a place only while nobody else needs it. Without a stalled
    one, it waits up to `PLACE_WAIT_S` for a place to free (in arrival order, mostly), then UNAVAILABLE:
    many clients pulling at a round's opening are served in turn instead of retrying with backoff. A client
    whose stream was ended for its silence in the last `SILENCED_S` waits in no line: refused at once when
    no place is free, its silent streams take no turns from the others."""

    def __init__(self, limit: int, idle_s: float, max_s: float):
        self.limit, self.idle_s, self.max_s = limit, idle_s, max_s
        self.lock = threading.Lock()
        self.freed = threading.Condition(self.lock)  # a place was given back
        self.queue: list[object] = []  # the streams waiting for a place, in arrival order
        self.silenced: dict[str, float] = {}  # per client, when a stream of it was last ended for silence
        self.open: set[Stream] = set()
        self.watchdog: threading.Thread | None = None

    @contextmanager
    def slot(self, client_id: str, context: grpc.ServicerContext) -> Iterator[Stream]:
        """Hold a place for a stream of `client_id` while the block runs; UNAVAILABLE when it has
        `STREAMS_PER_CLIENT` open, or no place freed within `PLACE_WAIT_S`."""
        with self.lock:
            if sum(s.client_id == client_id for s in self.open) >= STREAMS_PER_CLIENT:
                raise Rejected("UNAVAILABLE", f"client {client_id} has {STREAMS_PER_CLIENT} streams open")
            now = time.monotonic()
            patient = now - self.silenced.get(client_id, -math.inf) > SILENCED_S
            until, ticket = now + (PLACE_WAIT_S if patient else 0.0), object()
            self.queue.append(ticket)
            try:
                while len(self.open) >= self.limit:
                    self.preempt(now)
                    if len(self.open) < self.limit:
                        break
                    if now >= until or not context.is_active():
                        raise Rejected(
                            "UNAVAILABLE", f"{len(self.open)} streams are open, the most served: retry"
                        )
                    # the first in line looks again as streams may stall; the others wait their turn
                    first = self.queue[0] is ticket
                    self.freed.wait(min(until - now, FIRST_MESSAGE_S) if first else until - now)
                    now = time.monotonic()
            finally:
                self.queue.remove(ticket)
                if self.queue:
                    self.freed.notify()  # the next in line may be first now
            stream = Stream(client_id, context, now, now)
            self.open.add(stream)
            if self.watchdog is None:
                self.watchdog = threading.Thread(target=self.watch, name="fedmoe-streams", daemon=True)
                self.watchdog.start()
        try:
            yield stream
        finally:
            with self.lock:
                self.open.discard(stream)
                self.freed.notify()

    def preempt(self, now: float) -> None:
        """End the stalled stream silent longest, if any, to free its place (under the lock)."""
        stalled = [s for s in self.open if s.stalled(now)]
        if not stalled:
            return
        quiet = min(stalled, key=lambda s: s.active)
        quiet.ended = f"silent for {now - quiet.active:.1f} s while another stream waited for its place"
        self.open.discard(quiet)
        self.silence(quiet.client_id, now)
        log.warning("stream of client %s ended: %s", quiet.client_id, quiet.ended)
        quiet.context.cancel()

    def silence(self, client_id: str, now: float) -> None:
        """A stream of `client_id` was ended for its silence at `now` (under the lock; see `slot`)."""
        self.silenced = {c: t for c, t in self.silenced.items() if now - t <= SILENCED_S}
        self.silenced[client_id] = now

    def watch(self) -> None:
        """Cancel streams idle or open too long, until none is open."""
        period = min(1.0, self.idle_s / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self.lock:
                if not self.open:
                    self.watchdog = None
                    return
                overdue = [s for s in self.open if not s.ended]
            for s in overdue:
                if now - s.active > self.idle_s:
                    s.ended = f"no message for {self.idle_s:g} s (transport.stream_idle_s)"
                    with self.lock:
                        self.silence(s.client_id, now)
                elif now - s.opened > self.max_s:
                    s.ended = f"open for more than {self.max_s:g} s (transport.stream_max_s)"
                else:
                    continue
                log.warning("stream of client %s ended: %s", s.client_id, s.ended)
                s.context.cancel()


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
    a client certificate of the federation's CA, which enrols it."""

    def __init__(
        self, coordinator: Coordinator, tokens: TokenAuthority, enrolment: str, mutual_tls: bool = False
    ):
        self.coordinator, self.tokens = coordinator, tokens
        self.enrolment, self.mutual_tls = enrolment, mutual_tls
        transport = coordinator.config.transport
        self.max_update_bytes = transport.max_update_bytes
        self.streams = Streams(transport.max_streams, transport.stream_idle_s, transport.stream_max_s)
        self.storing = threading.BoundedSemaphore(transport.max_streams)  # pushes read in full, being stored
        self.model_json = json.dumps(coordinator.model)
        # this round's deliveries as they travel (serialized PullFrames), by the engine's shared tensors of
        # each (see Engine.job): encoded once, sent to every worker that receives them
        self.encoded: dict[int, tuple[int, dict, list]] = {}
        self.encoding = threading.Lock()

    def authenticate(self, context: grpc.ServicerContext, client_id: str = "") -> str:
        """The member whose current token the call carries (it must be `client_id` when one is named)."""
        token = bearer(context.invocation_metadata())
        if token is None:
            abort(context, "UNAUTHENTICATED", "missing bearer token in the authorization metadata")
        try:
            owner = self.coordinator.authenticate(self.tokens.verify(token))
        except AuthError as e:
            abort(context, "UNAUTHENTICATED", str(e))
        except Rejected as e:
            abort(context, e.code, e.detail)
        if client_id and owner != client_id:
            abort(context, "PERMISSION_DENIED", f"the token was issued to another client than {client_id}")
        return owner

    def enrolled(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> bool:
        """Whether the caller presented the enrolment credential: the operator's token, or (mutual TLS) a
        verified client certificate."""
        if self.mutual_tls and context.auth_context().get("x509_common_name"):
            return True
        given = request.enrolment.encode()
        return bool(given) and hmac.compare_digest(given, self.enrolment.encode())

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if request.client_id:
            check_identifier("client_id", request.client_id)
            if request.proof:  # the pinned key proves who rejoins: no token needed
                try:
                    self.coordinator.check_proof(request.client_id, request.proof, request.proof_time)
                except Rejected as e:
                    abort(context, e.code, e.detail)
            else:
                self.authenticate(context, request.client_id)
        if len(request.enrolment) > MAX_TEXT or len(request.feature_sum) > MAX_FEATURES:
            abort(context, "INVALID_ARGUMENT", "an enrolment token or routing statistics far too long")
        p = request.profile
        try:
            profile = DeviceProfile(
                shown(p.name), p.memory_bytes, p.bits, tuple(p.densities) or (1.0,), p.speed or 1.0
            )
        except ValueError as e:
            abort(context, "INVALID_ARGUMENT", f"bad device profile: {e}")
        coordinator = self.coordinator
        try:
            member = coordinator.join(
                profile,
                request.name,
                request.client_id,
                request.public_key,
                np.asarray(request.feature_sum, dtype=np.float64),
                request.examples,
                enrolled=self.enrolled(request, context),
            )
        except Rejected as e:
            abort(context, e.code, e.detail)
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

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        client_id = self.authenticate(context, request.client_id)
        try:
            self.coordinator.leave(client_id)
        except Rejected as e:
            abort(context, e.code, e.detail)
        return pb.LeaveReply()

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.PullFrame | bytes]:
        client_id = self.authenticate(context, request.client_id)
        try:
            job = self.coordinator.job(client_id, request.worker_id)
            with self.streams.slot(client_id, context) as stream:
                assignment = Assignment(job.path, job.variant, job.seed)
                yield pb.PullFrame(assignment=assignment_message(assignment, job.round, job.inner))
                for frame in self.frames(job):
                    stream.touch()
                    yield frame
        except Rejected as e:
            abort(context, e.code, e.detail)

    def frames(self, job: Job) -> list[bytes]:
        """A job's tensors as serialized Pull frames, encoded once per delivery and round (the engine shares
        one tensors dict among the workers that receive the same; the entry keeps it, so its id stays its
        own)."""
        key = id(job.tensors)
        with self.encoding:
            entry = self.encoded.get(key)
            if entry is not None and entry[1] is job.tensors:
                return entry[2]
        frames = list(
            encode_tensors(job.tensors, into=pb.PullFrame, batch_bytes=CHUNK_BYTES, serialized=True)
        )
        with self.encoding:
            self.encoded = {k: e for k, e in self.encoded.items() if e[0] == job.round}
            self.encoded[key] = (job.round, job.tensors, frames)
        return frames

    def Push(self, request_iterator: Iterator[pb.PushFrame], context: grpc.ServicerContext) -> pb.PushReply:
        client_id = self.authenticate(context)  # from the metadata, before any message is read
        coordinator = self.coordinator
        try:
            with self.streams.slot(client_id, context) as stream:
                frames = moving(request_iterator, stream)
                first = next(frames, None)
                if not isinstance(first, pb.PushFrame) or first.WhichOneof("frame") != "header":
                    raise Rejected("INVALID_ARGUMENT", "a push starts with a PushHeader")
                header = first.header
                if header.client_id != client_id:
                    raise Rejected("PERMISSION_DENIED", f"the token was issued to {client_id}, not another")
                worker_id = header.worker_id and check_identifier("worker_id", header.worker_id)
                upload = header_upload(header)
                expected = coordinator.expected_upload(upload, client_id, header.update_id, worker_id)
                if sum(wire_bytes(shape, bits) for bits, shape in expected.values()) >= READ_AHEAD_BYTES:
                    frames = read_ahead(frames)  # received while the chunks before are hashed
                tensors = decode_tensors(tensor_frames(frames), self.max_update_bytes, expected)
                crash_point("push-read")  # read in full, nothing stored yet
            # its place goes to the next stream while the update is checked and stored (mostly waiting for
            # the disk), at most `max_streams` at once: a burst of pushes does not crowd the lock
            with self.storing:
                open_round = coordinator.submit(
                    replace(upload, tensors=tensors), client_id, header.update_id, header.signature, worker_id
                )
        except grpc.RpcError:  # the stream was cancelled: by the client, or by the watchdog
            log.info("push of client %s ended before its end: %s", client_id, stream.ended or "cancelled")
            return pb.PushReply()
        except WireError as e:
            abort(context, e.code.name, str(e))
        except Rejected as e:
            abort(context, e.code, e.detail)
        except ValueError as e:
            abort(context, "INVALID_ARGUMENT", str(e))
        return pb.PushReply(accepted=True, round=open_round, detail="stored")

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        client_id = self.authenticate(context, request.client_id)
        if not request.wait_s >= 0:  # NaN and negative waits
            abort(context, "INVALID_ARGUMENT", f"wait_s is a number of seconds >= 0, got {request.wait_s}")
        woken = threading.Event()
        context.add_callback(woken.set)  # the call ended (cancelled, timed out, or the server stops)
        try:
            action, workers = self.coordinator.held_action(
                client_id, request.wait_s, woken, context.is_active
            )
        except Rejected as e:
            abort(context, e.code, e.detail)
        return pb.HeartbeatReply(
            action=getattr(pb.HeartbeatReply, action), round=self.coordinator.round, workers=workers
        )

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=json.dumps(self.coordinator.status()))

    def Proposal(self, request: pb.ProposalRequest, context: grpc.ServicerContext) -> pb.ProposalReply:
        client_id = self.authenticate(context, request.client_id)
        try:
            return proposal_message(self.coordinator.proposal(client_id))
        except Rejected as e:
            abort(context, e.code, e.detail)

    def Cluster(self, request: pb.ClusterReport, context: grpc.ServicerContext) -> pb.ClusterReply:
        client_id = self.authenticate(context, request.client_id)
        try:
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
        except Rejected as e:
            abort(context, e.code, e.detail)
        return pb.ClusterReply(pass_number=now.number, converged=now.converged)

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignReply:
        client_id = self.authenticate(context, request.client_id)
        coordinator = self.coordinator
        try:
            workers = coordinator.assign(client_id, np.asarray(request.histogram, dtype=np.float64))
        except Rejected as e:
            abort(context, e.code, e.detail)
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


def moving(frames: Iterator[Any], stream: Stream) -> Iterator[Any]:
    """The frames of a request stream, each marking the stream active; a frame that does not parse ends it
    INVALID_ARGUMENT."""
    for frame in frames:
        stream.touch()
        if frame is MALFORMED:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push frame that does not parse")
        yield frame


def add_coordinator(service: CoordinatorService, server: grpc.Server) -> None:
    """Register the service's methods, their requests parsed by `parser` (a unary request that does not
    parse is answered INVALID_ARGUMENT by the handler; a stream's chunk frames by `frame_parser`), their
    replies serialized by `frame_bytes`."""
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        request = getattr(pb, method.input_type.name)
        behaviour = getattr(service, method.name)
        if not method.client_streaming:
            behaviour = parsed(behaviour, method.input_type.name)
        parse = frame_parser(request) if method.client_streaming else parser(request)
        handlers[method.name] = makers[(method.client_streaming, method.server_streaming)](
            behaviour, request_deserializer=parse, response_serializer=frame_bytes
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def parsed(behaviour: Callable[[Any, grpc.ServicerContext], Any], name: str) -> Callable:
    """`behaviour`, answering INVALID_ARGUMENT for a request that did not parse."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if request is MALFORMED:
            abort(context, "INVALID_ARGUMENT", f"the request does not parse as a {name}")
        return behaviour(request, context)

    return call


def tensor_frames(frames: Iterator[pb.PushFrame | memoryview]) -> Iterator:
    """The tensor frames after a push's header (a chunk's data as a memoryview); a second header is
    malformed."""
    for frame in frames:
        if isinstance(frame, memoryview):
            yield frame
            continue
        if frame.WhichOneof("frame") != "tensor":
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push carries exactly one PushHeader, first")
        yield frame.tensor


def listen(
    server: grpc.Server, address: str, certs: str | None, service: str, mutual_tls: bool = False
) -> int:
    """Add health checking (overall and for `service`), bind `address` (TLS with `certs`, requiring client
    certificates with `mutual_tls`), start; the port.

    `server` must be made with `server_options` (no port sharing): a port in use raises OSError
    "port N is in use".
    """
    health_servicer = health.HealthServicer()
    for name in ("", service):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if certs:
            port = server.add_secure_port(address, server_credentials(certs, mutual_tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(bind_error(address))
    server.start()
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


def start_server(
    coordinator: Coordinator, address: str | None = None, certs: str | None = None
) -> tuple[grpc.Server, int]:
    """Start the coordinator (and the standard health service) on `address` (default
    `transport.address`); returns the server and its port.

    With `certs` (default `transport.certs`: a directory made by `fedmoe certs`) the port speaks TLS, and
    with `transport.mutual_tls` it requires a client certificate of the same CA; otherwise it is plain text.
    Threads, stream bounds and the largest update come from the coordinator's `config.transport`, and beside
    its `threads`, one per push being stored (at most `max_streams`) and one per member whose heartbeat is
    held (a long-poll: `Coordinator.held_action`, at most `membership.max_members`; threads start when first
    needed and idle ones cost no work); the enrolment token from
    `fedmoe.security.enrolment_token(state_dir, certs)`. Raises OSError when the port is
    in use.
    """
    transport = coordinator.config.transport
    address, certs = address or transport.address, certs or transport.certs
    if transport.mutual_tls and not certs:
        raise ValueError("transport.mutual_tls needs TLS: give the certificates (--certs)")
    options = server_options(*MESSAGE_OPTIONS)
    threads = transport.threads + transport.max_streams + coordinator.config.membership.max_members
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
    state_dir = FsPath(coordinator.state_dir)
    tokens = TokenAuthority.load_or_create(state_dir / "token.secret")
    enrolment = enrolment_token(state_dir, certs)
    service = CoordinatorService(coordinator, tokens, enrolment, transport.mutual_tls)
    add_coordinator(service, server)
    port = listen(server, address, certs, SERVICE, transport.mutual_tls)
    log.info("coordinator listening on %s (port %d, %s)", address, port, "TLS" if certs else "plain text")
    return server, port
