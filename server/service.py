"""The coordinator over gRPC: authentication, streaming of tensors, health checking, clustering messages."""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path as FsPath

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.assignment import DeviceProfile
from fedmoe.config import InnerConfig
from fedmoe.engine import Assignment
from fedmoe.modular import Path
from fedmoe.security import AuthError, TokenAuthority, bearer, server_credentials
from fedmoe.server.coordinator import Coordinator, Proposal, Rejected
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import WireError, decode_tensors, encode_tensors
from fedmoe.worker import Upload, Variant

log = logging.getLogger("fedmoe.server")
MAX_UPDATE_BYTES = 4 << 30
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def abort(context: grpc.ServicerContext, code: str, detail: str) -> None:
    """End the call with a precise status; the coordinator's state is unchanged."""
    log.warning("rejected: %s %s", code, detail)
    context.abort(getattr(grpc.StatusCode, code), detail)


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
    )


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Join, Pull, Push, Heartbeat, Status, and routing by data's Proposal, Cluster and Assign, on top of a
    `Coordinator`."""

    def __init__(
        self, coordinator: Coordinator, tokens: TokenAuthority, max_update_bytes: int = MAX_UPDATE_BYTES
    ):
        self.coordinator, self.tokens, self.max_update_bytes = coordinator, tokens, max_update_bytes
        self.model_json = json.dumps(coordinator.model)

    def authenticate(self, context: grpc.ServicerContext, client_id: str) -> None:
        """The call must carry a valid token issued to `client_id`."""
        token = bearer(context.invocation_metadata())
        if token is None:
            abort(context, "UNAUTHENTICATED", "missing bearer token in the authorization metadata")
        try:
            owner = self.tokens.verify(token)
        except AuthError as e:
            abort(context, "UNAUTHENTICATED", str(e))
        if owner != client_id:
            abort(context, "PERMISSION_DENIED", f"the token was issued to another client than {client_id}")

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if request.client_id:
            self.authenticate(context, request.client_id)
        p = request.profile
        profile = DeviceProfile(p.name, p.memory_bytes, p.bits, tuple(p.densities) or (1.0,), p.speed or 1.0)
        coordinator = self.coordinator
        try:
            member = coordinator.join(
                profile,
                request.name,
                request.client_id,
                request.public_key,
                np.asarray(request.feature_sum, dtype=np.float64),
                request.examples,
            )
        except Rejected as e:
            abort(context, e.code, e.detail)
        reply = pb.JoinReply(
            client_id=member.client_id, token=self.tokens.issue(member.client_id), model_json=self.model_json
        )
        with coordinator.lock:
            assignment = coordinator.assignment(member.client_id)
            if assignment is not None:
                inner = coordinator.engine.inner(coordinator.round)
                reply.assignment.CopyFrom(assignment_message(assignment, coordinator.round, inner))
        return reply

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.PullFrame]:
        self.authenticate(context, request.client_id)
        try:
            job = self.coordinator.job(request.client_id, request.worker_id)
        except Rejected as e:
            abort(context, e.code, e.detail)
        assignment = Assignment(job.path, job.variant, job.seed)
        yield pb.PullFrame(assignment=assignment_message(assignment, job.round, job.inner))
        for frame in encode_tensors(job.tensors):
            yield pb.PullFrame(tensor=frame)

    def Push(self, request_iterator: Iterator[pb.PushFrame], context: grpc.ServicerContext) -> pb.PushReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "header":
            abort(context, "INVALID_ARGUMENT", "a push starts with a PushHeader")
        header = first.header
        self.authenticate(context, header.client_id)
        try:
            tensors = decode_tensors(tensor_frames(request_iterator), self.max_update_bytes)
            v = header.variant
            upload = Upload(
                Path.parse(header.path),
                Variant(v.bits, round(v.density, 6), v.scheme),
                header.round,
                header.seed,
                header.weight,
                tensors,
                header.loss,
                dict(header.evaluation),
            )
            open_round = self.coordinator.submit(
                upload, header.client_id, header.update_id, header.signature, header.worker_id
            )
        except WireError as e:
            abort(context, e.code.name, str(e))
        except Rejected as e:
            abort(context, e.code, e.detail)
        except ValueError as e:
            abort(context, "INVALID_ARGUMENT", str(e))
        return pb.PushReply(accepted=True, round=open_round, detail="stored")

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self.authenticate(context, request.client_id)
        try:
            action, workers = self.coordinator.action(request.client_id)
        except Rejected as e:
            abort(context, e.code, e.detail)
        return pb.HeartbeatReply(
            action=getattr(pb.HeartbeatReply, action), round=self.coordinator.round, workers=workers
        )

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=json.dumps(self.coordinator.status()))

    def Proposal(self, request: pb.ProposalRequest, context: grpc.ServicerContext) -> pb.ProposalReply:
        self.authenticate(context, request.client_id)
        try:
            return proposal_message(self.coordinator.proposal(request.client_id))
        except Rejected as e:
            abort(context, e.code, e.detail)

    def Cluster(self, request: pb.ClusterReport, context: grpc.ServicerContext) -> pb.ClusterReply:
        self.authenticate(context, request.client_id)
        try:
            now = self.coordinator.cluster(
                request.client_id,
                request.pass_number,
                *(
                    np.asarray(values, dtype=np.float64)
                    for values in (request.counts, request.sums, request.squares, request.soft)
                ),
            )
        except Rejected as e:
            abort(context, e.code, e.detail)
        return pb.ClusterReply(pass_number=now.number, converged=now.converged)

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignReply:
        self.authenticate(context, request.client_id)
        coordinator = self.coordinator
        try:
            workers = coordinator.assign(request.client_id, np.asarray(request.histogram, dtype=np.float64))
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


def tensor_frames(frames: Iterator[pb.PushFrame]) -> Iterator:
    """The tensor frames after a push's header; a second header is malformed."""
    for frame in frames:
        if frame.WhichOneof("frame") != "tensor":
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a push carries exactly one PushHeader, first")
        yield frame.tensor


def listen(server: grpc.Server, address: str, certs: str | None, service: str) -> int:
    """Add health checking (overall and for `service`), bind `address` (TLS with `certs`), start; the port.

    `server` must be made with `server_options` (no port sharing): a port in use raises OSError
    "port N is in use".
    """
    health_servicer = health.HealthServicer()
    for name in ("", service):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if certs:
            port = server.add_secure_port(address, server_credentials(certs))
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
    coordinator: Coordinator,
    address: str,
    certs: str | None = None,
    workers: int = 16,
    max_update_bytes: int = MAX_UPDATE_BYTES,
) -> tuple[grpc.Server, int]:
    """Start the coordinator (and the standard health service) on `address`; returns the server and its port.

    With `certs` (a directory made by `fedmoe certs`) the port speaks TLS; otherwise it is plain text.
    A push that declares more than `max_update_bytes` is refused before its data is read. Raises OSError
    when the port is in use.
    """
    options = server_options(*MESSAGE_OPTIONS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    tokens = TokenAuthority.load_or_create(FsPath(coordinator.state_dir) / "token.secret")
    service = CoordinatorService(coordinator, tokens, max_update_bytes)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    port = listen(server, address, certs, "fedmoe.v1.Coordinator")
    log.info("coordinator listening on %s (port %d, %s)", address, port, "TLS" if certs else "plain text")
    return server, port
