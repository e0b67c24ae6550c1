"""The client runtime: join a coordinator, then pull, train and push each round until training is done."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedmoe.experiment import make_shards
from fedmoe.modular import ModularModel, Path
from fedmoe.models import ModelSpec
from fedmoe.security import channel_credentials, new_signing_key, public_bytes, update_digest
from fedmoe.assignment import PROFILES, DeviceProfile
from fedmoe.tasks import load_task
from fedmoe.train import Batch, InnerConfig
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors, encode_tensors
from fedmoe.worker import Upload, Variant, Worker, round_masks, signed_fields

log = logging.getLogger("fedmoe.client")
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_PULL_BYTES = 4 << 30


@dataclass
class Session:
    """A joined client: its id, token, update-signing key and the coordinator's model description."""

    client_id: str
    token: str
    model: dict[str, Any]
    assignment: pb.Assignment
    signing_key: ed25519.Ed25519PrivateKey

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token."""
        return (("authorization", f"Bearer {self.token}"),)


def connect(server: str, certs: str | None = None) -> grpc.Channel:
    """A channel to `server` ("host:port"): TLS when `certs` names a `fedmoe certs` directory."""
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    if certs:
        return grpc.secure_channel(server, channel_credentials(certs), options=options)
    return grpc.insecure_channel(server, options=options)


def retrying(call: Callable[[], T], deadline: float, what: str) -> T:
    """Run `call`, retrying with exponential backoff while the coordinator is unreachable, until `deadline`."""
    delay = 0.2
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or time.monotonic() + delay > deadline:
                raise
            log.info("%s: coordinator unreachable (%s); retrying in %.1f s", what, e.code().name, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def profile_message(profile: DeviceProfile) -> pb.DeviceProfile:
    """The wire form of a device profile."""
    return pb.DeviceProfile(name=profile.name, memory_bytes=profile.memory_bytes, bits=profile.bits,
                            densities=list(profile.densities), speed=profile.speed)


def join(stub: pb_grpc.CoordinatorStub, profile: DeviceProfile, name: str, state_file: FsPath | None, deadline: float) -> Session:
    """Join, or rejoin with the identity kept in `state_file` (a client that restarts keeps its path)."""
    saved = json.loads(state_file.read_text()) if state_file and state_file.exists() else {}
    metadata = (("authorization", f"Bearer {saved['token']}"),) if saved else ()
    key = new_signing_key()  # a fresh key per process: the private key never leaves memory
    request = pb.JoinRequest(profile=profile_message(profile), name=name, client_id=saved.get("client_id", ""), public_key=public_bytes(key))
    reply = retrying(lambda: stub.Join(request, metadata=metadata, timeout=30), deadline, "join")
    if state_file:
        state_file.write_text(json.dumps({"client_id": reply.client_id, "token": reply.token}))
        state_file.chmod(0o600)
    return Session(reply.client_id, reply.token, json.loads(reply.model_json), reply.assignment, key)


def run(
    server: str,
    profile: str | DeviceProfile = "fp32",
    data: Iterator[Batch] | None = None,
    weight: float | None = None,
    model_fn: Callable[[ModelSpec], ModularModel] | None = None,
    certs: str | None = None,
    name: str = "",
    state_file: str | None = None,
    poll_s: float = 0.2,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Join the federation at `server` and train the assigned path every round until training is done.

    `data` is an endless iterator of (inputs, targets) batches from the user's own data (by default
    the coordinator's built-in task, on the shard it assigns); `weight` is the data's size for
    averaging; `model_fn` builds the grid from the coordinator's ModelSpec (default: the built-in
    families). Returns a summary: client id, path, variant, rounds trained and bytes uploaded.
    """
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    deadline = time.monotonic() + timeout_s
    with connect(server, certs) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        session = join(stub, profile, name, FsPath(state_file) if state_file else None, deadline)
        a = session.assignment
        spec = ModelSpec.from_dict(session.model["model"])
        if data is None:
            task = load_task(session.model["task"])
            shards, _ = make_shards(task, session.model["partition"], a.shards, session.model["seed"], session.model["clustering"])
            data, weight = task.batches(shards[a.shard], a.batch_size, a.seed), float(len(shards[a.shard]))
        variant = Variant(a.variant.bits, round(a.variant.density, 6), a.variant.scheme)
        worker = Worker(Path.parse(a.path), data, weight or 1.0, variant, a.seed)
        log.info("joined as %s: path %s, variant %s", session.client_id, a.path, variant.name)
        trained, uploaded = [], 0
        while time.monotonic() < deadline:
            beat = retrying(lambda: stub.Heartbeat(pb.HeartbeatRequest(client_id=session.client_id), metadata=session.metadata, timeout=30), deadline, "heartbeat")
            if beat.action == pb.HeartbeatReply.DONE:
                break
            if beat.action == pb.HeartbeatReply.WAIT:
                time.sleep(poll_s)
                continue
            upload = train_round(stub, session, worker, spec, model_fn, deadline)
            try:
                reply = retrying(lambda: stub.Push(push_frames(session, upload), metadata=session.metadata, timeout=600), deadline, "push")
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                    raise
                log.info("round %d: update not used (%s)", upload.round, e.details())
                continue
            trained.append(upload.round)
            uploaded += upload.nbytes
            log.info("round %d: loss %.4f, sent %d bytes; round %d is open", upload.round, upload.loss, upload.nbytes, reply.round)
        else:
            raise TimeoutError(f"training did not finish within {timeout_s} s")
    return {"client_id": session.client_id, "path": a.path, "variant": variant.name, "rounds": trained, "upload_bytes": uploaded}


def train_round(stub: pb_grpc.CoordinatorStub, session: Session, worker: Worker, spec: ModelSpec,
                model_fn: Callable[[ModelSpec], ModularModel] | None, deadline: float) -> Upload:
    """Pull this round's weights, train them locally and return the compressed outer gradient."""
    frames = retrying(lambda: list(stub.Pull(pb.PullRequest(client_id=session.client_id), metadata=session.metadata, timeout=600)), deadline, "pull")
    if not frames or frames[0].WhichOneof("frame") != "assignment":
        raise ValueError("the coordinator's Pull stream did not start with an assignment")
    a = frames[0].assignment
    delivered = decode_tensors((f.tensor for f in frames[1:]), MAX_PULL_BYTES)
    path_model = (model_fn or ModelSpec.build)(spec).compose(worker.path)
    masks = round_masks(path_model, worker.variant, a.round, worker.seed)
    inner = InnerConfig(steps=a.inner_steps, lr=a.inner_lr, batch_size=a.batch_size)
    return worker.train_round(path_model, delivered, masks, inner, a.round)


def push_frames(session: Session, upload: Upload, update_id: str | None = None) -> Iterator[pb.PushFrame]:
    """A push: the signed header, then the tensor stream."""
    v = upload.variant
    update_id = update_id or uuid.uuid4().hex
    digest = update_digest(signed_fields(session.client_id, update_id, upload), upload.tensors)
    header = pb.PushHeader(client_id=session.client_id, round=upload.round, path=str(upload.path),
                           variant=pb.Variant(bits=v.bits, density=v.density, scheme=v.scheme), seed=upload.seed,
                           weight=upload.weight, loss=upload.loss, update_id=update_id, signature=session.signing_key.sign(digest))
    yield pb.PushFrame(header=header)
    for frame in encode_tensors(upload.tensors):
        yield pb.PushFrame(tensor=frame)
