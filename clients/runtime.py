"""The client SDK: join a coordinator with your data, then pull, train and push each round until it is done.

    from fedmoe.clients import run
    run("coordinator.example:7000", "mypkg.problem:spec", "int8", data=(inputs, targets), certs="certs")

`run` checks what it can before it joins, and each error names the fix: the server address, the device
profile, the form of `data`, the first batch against the spec (two tensors, target dtype, an input shape
the model accepts, labels in range for classifiers) and the model against the coordinator's (parameter
names and shapes). An unreachable coordinator is retried with a WARNING per attempt for `retry_s` seconds.
The client trains with the same `fedmoe.worker.Worker` as every other runner. Each update has one id, sent
with every retry; with a state file (`ClientState`) the client keeps its workers' state and their last
updates on disk before pushing, so that a killed client continues as if it had not stopped.

When the coordinator routes by data (routing.assign = "data"), the client computes its examples' routing
features once, answers the federated k-means proposals with their per-cluster statistics, sends the
histogram of its examples over the converged clusters, and trains one worker per cluster it was given,
each on its examples of that cluster, exactly as `fedmoe.federation.enrol` does in process. Nothing but
those aggregates, outer gradients and metrics leaves it.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path as FsPath
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from torch import nn

from fedmoe.assignment import PROFILES, DeviceProfile
from fedmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedmoe.clustering import cluster_stats, histogram, upper_triangles
from fedmoe.compress.quant import QTensor
from fedmoe.config import InnerConfig
from fedmoe.ensemble import describe_mismatch
from fedmoe.modular import Path
from fedmoe.security import (
    KEY_MODE,
    channel_credentials,
    given_enrolment,
    new_signing_key,
    public_bytes,
    rejoin_message,
    update_digest,
    write_file,
)
from fedmoe.spec import Batch, ClientData, Examples, Spec, cross_entropy, load_spec
from fedmoe.train import Compute
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import CHUNK_BYTES, chunk_view, decode_tensors, encode_tensors, frame_bytes, read_ahead
from fedmoe.worker import (
    Job,
    LocalExamples,
    Upload,
    Variant,
    Worker,
    load_upload,
    signed_fields,
    upload_state,
)

log = logging.getLogger("fedmoe.client")
T = TypeVar("T")
# a coordinator that stops cancels the calls in flight (CANCELLED); this client never cancels its own
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
SCHEMES = ("http://", "https://", "grpc://", "grpcs://")
MAX_PULL_BYTES = 4 << 30
CALL_TIMEOUT_S = 30.0
HOLD_S = 30.0  # how long the coordinator may hold a heartbeat while there is nothing to do (a long-poll)
STREAM_TIMEOUT_S = 600.0
RETRY_DELAYS_S = (0.5, 1.5, 4.0)  # the first wait between retries, the growth of each next, the longest
PROBE_EXAMPLES = 8  # examples of an `Examples` run through the model to check its inputs


# -- checks before joining -------------------------------------------------------------------
def check_address(server: str) -> str:
    """`server` as host:port, or ValueError naming the fix (a scheme, no port, IPv6 without brackets)."""
    if not isinstance(server, str):
        raise TypeError(f"server is a 'host:port' string, got {type(server).__name__}")
    text = server.strip()
    for scheme in SCHEMES:
        if text.lower().startswith(scheme):
            rest = text[len(scheme) :].rstrip("/")
            raise ValueError(f"server {server!r}: drop the scheme: give host:port, e.g. {rest!r}")
    host, sep, port = text.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"server {server!r}: put an IPv6 address in brackets, e.g. '[{host}]:{port}'")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"server {server!r} is not host:port: give e.g. '127.0.0.1:7000' or 'coordinator.example:7000'"
        )
    return text


def resolve_profile(profile: str | DeviceProfile) -> DeviceProfile:
    """A device profile by name (see `fedmoe.assignment.PROFILES`), or the one given."""
    if isinstance(profile, DeviceProfile):
        return profile
    if isinstance(profile, str) and profile in PROFILES:
        return PROFILES[profile]
    raise ValueError(
        f"unknown profile {profile!r}; known: {', '.join(PROFILES)} "
        "(or pass a fedmoe.assignment.DeviceProfile)"
    )


def resolve_weight(weight: Any) -> float | None:
    """`weight` as a positive float (it is signed as a float), or None."""
    if weight is None:
        return None
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(
            f"weight is the number of examples behind your data, a number; got {type(weight).__name__}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"weight is the number of examples behind your data, a positive number; got {weight!r}"
        )
    return value


def check_data_form(data: Any) -> None:
    """Raise TypeError unless `data` is None, ClientData, Examples, a tuple of two tensors or an iterator."""
    if data is None or isinstance(data, ClientData | Examples | Iterator):
        return
    if isinstance(data, tuple) and len(data) == 2:
        if all(isinstance(t, torch.Tensor) for t in data):
            return
        kinds = ", ".join(type(t).__name__ for t in data)
        raise TypeError(
            f"data as a tuple is (inputs, targets), two torch tensors; got ({kinds}): "
            "convert them with torch.as_tensor"
        )
    hint = "wrap it: iter(batches) or a generator" if hasattr(data, "__iter__") else "see fedmoe.clients.run"
    raise TypeError(
        f"data is a {type(data).__name__}, not one of: None (the spec's data), ClientData, "
        "Examples, an (inputs, targets) tuple of tensors, or an endless iterator of "
        f"(inputs, targets) batches; {hint}"
    )


def check_batch(spec: Spec, batch: Any, probe: nn.Module, all_targets: torch.Tensor | None = None) -> None:
    """Check a batch against the spec, raising TypeError/ValueError that names the fix.

    Two tensors of equal length; for a cross-entropy spec, integer targets; inputs that the model
    (`probe`, a path of a one-module-per-level build of the spec) accepts and the featurizer turns into
    (N, F) features; for classifiers, labels in range (on `all_targets` when given); a loss the spec computes.
    """
    name = spec.ref or spec.name
    sequence = isinstance(batch, tuple | list)
    if not (sequence and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        got = f"a {type(batch).__name__}" + (f" of {len(batch)}" if sequence else "")
        raise TypeError(
            f"a batch is two torch tensors (inputs, targets), got {got}: "
            "make your data yield (inputs, targets) tuples"
        )
    inputs, targets = batch
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"a batch has {len(inputs)} inputs and {len(targets)} targets: "
            "give one target per input (and at least one)"
        )
    classifier = spec.loss is cross_entropy
    if classifier and (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool):
        raise TypeError(
            f"targets are {targets.dtype}, but spec {name!r} trains with cross-entropy, "
            "which takes class indices: pass targets.long()"
        )
    weights = next(probe.parameters(), None)
    try:
        with torch.no_grad():
            outputs = probe(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        hint = ""
        if weights is not None and inputs.is_floating_point() and inputs.dtype != weights.dtype:
            hint = f"; the model's weights are {weights.dtype}: convert them with inputs.to({weights.dtype})"
        raise ValueError(
            f"the model of spec {name!r} does not accept inputs of shape {tuple(inputs.shape)} "
            f"({inputs.dtype}): {e}{hint}. Give inputs shaped as the spec's first module expects"
        ) from None
    try:
        features = spec.featurize(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"spec {name!r}'s featurize fails on inputs of shape {tuple(inputs.shape)}: {e}"
        ) from None
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or len(features) != len(inputs):
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"spec {name!r}'s featurize must return (N, F) routing features, got {got}")
    if classifier:
        n, labels = outputs.shape[-1], targets if all_targets is None else all_targets
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= n:
            raise ValueError(
                f"labels run from {low} to {high}, but the model of spec {name!r} has {n} "
                f"outputs (labels 0..{n - 1}): renumber the classes from 0, "
                f"or give the model {high + 1} outputs"
            )
    try:
        spec.loss(outputs, targets)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"spec {name!r}'s loss fails on outputs of shape {tuple(outputs.shape)} and "
            f"targets of shape {tuple(targets.shape)} ({targets.dtype}): {e}"
        ) from None


def check_model(spec: Spec, model: dict[str, Any]) -> None:
    """Raise ValueError unless this client's spec builds the coordinator's parameters and shapes (checked on
    one module per level: every module of a level comes from that level's factory)."""
    expected = {k: {n: tuple(s) for n, s in d.items()} for k, d in model["shapes"].items()}
    levels = spec.build((1,) * len(model["grid"]))
    found = {
        key: {n: tuple(p.shape) for n, p in levels.module(f"{key.split('.')[0]}.0").named_parameters()}
        for key in expected
    }
    if expected != found:
        grid_text = "x".join(map(str, model["grid"]))
        raise ValueError(
            f"spec {spec.ref or spec.name!r} builds a model unlike the coordinator's "
            f"(spec {model['spec']!r}, grid {grid_text}): {describe_mismatch(expected, found)}; "
            "run the client with the coordinator's spec"
        )


@dataclass(frozen=True, eq=False)
class LocalData:
    """A client's data as it trains on it: batches (made once assigned), weight, routing statistics, and
    its training and held-out examples when it has them (not for a stream of batches)."""

    batches: Callable[[int, int], Iterator[Batch]]  # (batch_size, seed) -> batches
    weight: float
    feature_sum: np.ndarray | None  # the sum of its routing features (None: not computed yet)
    examples: float
    train: Examples | None = None
    test: Examples | None = None


def prepare_data(spec: Spec, data: Any, weight: float | None, partition: int, partitions: int) -> LocalData:
    """Turn any accepted form of `data` into `LocalData`, checking it against the spec (see `run`)."""
    if data is None:
        if spec.data is None:
            raise ValueError(
                f"spec {spec.ref or spec.name!r} has no data loader: pass data= (your examples or batches)"
            )
        if not 0 <= partition < partitions:
            raise ValueError(
                f"partition must be in 0..{partitions - 1} (partitions={partitions}), got {partition}"
            )
        data = spec.data(partition, partitions)
    test = None
    if isinstance(data, ClientData):
        data, test = data.train, data.test
    if isinstance(data, tuple):
        data = Examples(*data)
    levels = spec.default_levels
    probe = spec.build((1,) * levels).compose(Path((0,) * levels))
    if isinstance(data, Examples):
        check_batch(spec, (data.inputs[:PROBE_EXAMPLES], data.targets[:PROBE_EXAMPLES]), probe, data.targets)
        # routing statistics are computed only if paths go in turn (see `run`)
        return LocalData(data.batches, weight or float(len(data)), None, float(len(data)), data, test)
    if weight is None:
        raise ValueError(
            "with an iterator of batches, pass weight= "
            "(the number of examples behind them: its weight in the average)"
        )
    first = next(data, None)
    if first is None:
        raise ValueError("the data iterator is empty: give an endless iterator of (inputs, targets) batches")
    check_batch(spec, first, probe)
    batch_sum, count = spec.feature_statistics(Examples(*first))
    stream = endless(itertools.chain([first], data))
    return LocalData(lambda size, seed: stream, weight, batch_sum * (weight / count), weight)


def endless(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The batches, then a clear error instead of StopIteration when a finite iterator runs out."""
    drawn = 0
    for batch in batches:
        drawn += 1
        yield batch
    raise ValueError(
        f"the data iterator ran out after {drawn} batches: training draws inner.steps batches "
        "every round; give an endless one (itertools.cycle, or a generator with `while True`)"
    )


# -- the wire --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retry:
    """Calls retried while the coordinator at `server` is down: `retry_s` per outage, until `deadline`."""

    server: str
    retry_s: float = 120.0
    deadline: float = math.inf

    def __call__(self, call: Callable[[], T], what: str) -> T:
        """Run `call`, retrying the codes in RETRYABLE with backoff (`RETRY_DELAYS_S`) and a WARNING per
        retry: a coordinator back after a restart is reached within a few seconds."""
        (delay, growth, longest), since = RETRY_DELAYS_S, None
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                now = time.monotonic()
                since = now if since is None else since
                wait = min(delay, since + self.retry_s - now)
                if wait <= 0:
                    raise ConnectionError(
                        f"cannot reach the coordinator at {self.server} for {self.retry_s:g} s "
                        f"({what}: {e.code().name}: {e.details()}): check the address (host:port), "
                        "that `fedmoe server` runs there and the port is open, and pass certs= (--certs) "
                        "if it speaks TLS; raise retry_s (--retry) to wait longer"
                    ) from None
                if now + wait > self.deadline:
                    raise TimeoutError(
                        f"{what}: the overall timeout (timeout_s) ran out while the "
                        f"coordinator at {self.server} was unreachable"
                    ) from None
                log.warning(
                    "%s: cannot reach the coordinator at %s (%s); retrying in %.1f s, for up to %g s",
                    what,
                    self.server,
                    e.code().name,
                    wait,
                    self.retry_s,
                )
                time.sleep(wait)
                delay = min(growth * delay, longest)


# -- the client's durable state ---------------------------------------------------------------
@dataclass
class Held:
    """A worker's last update: its upload, its id (the same on every send), and whether the coordinator
    acknowledged it. Kept until a heartbeat shows its round closed: a coordinator that lost it asks again."""

    upload: Upload
    update_id: str
    acknowledged: bool = False


class ClientState:
    """What a client keeps in its state file (`file`, JSON, mode 0o600) and beside it, so that a killed client
    continues as if it had not stopped.

    - `file`: {"client_id", "token", "signing_key" (the raw Ed25519 private key, hex), "acknowledged":
      {worker id: the id of its last update the coordinator acknowledged}}.
    - `<file>.d/<worker id>/`: a checkpoint (`fedmoe.checkpoint`) per worker, written after each round's
      training and before its push: the worker's state (`Worker.state`: optimiser, error feedback, batch
      stream position), its assignment (path, variant, seed) and its last update (`upload_state`, its id).
    """

    def __init__(self, file: str | os.PathLike[str]):
        self.file = FsPath(file)
        self.directory = self.file.with_name(f"{self.file.name}.d")
        try:
            self.saved: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{self.file} is not a client state file ({e}): give another --state-file, or delete it "
                "to join as a new client"
            ) from None

    @property
    def client_id(self) -> str:
        """The client's id ("" before it first joined)."""
        return self.saved.get("client_id", "")

    @property
    def token(self) -> str:
        """The client's bearer token ("" before it first joined)."""
        return self.saved.get("token", "")

    def signing_key(self) -> ed25519.Ed25519PrivateKey:
        """The key the client signs its updates with: the saved one, or a new one."""
        saved = self.saved.get("signing_key")
        return (
            ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(saved)) if saved else new_signing_key()
        )

    def save_identity(self, client_id: str, token: str, key: ed25519.Ed25519PrivateKey) -> None:
        """Keep the client's id, token and signing key (the acknowledgements of another id are dropped)."""
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        acknowledged = self.saved.get("acknowledged", {}) if client_id == self.client_id else {}
        self.write(
            {"client_id": client_id, "token": token, "signing_key": raw.hex(), "acknowledged": acknowledged}
        )

    def acknowledge(self, worker_id: str, update_id: str) -> None:
        """Record that the coordinator acknowledged update `update_id` of a worker."""
        self.write(
            {**self.saved, "acknowledged": {**self.saved.get("acknowledged", {}), worker_id: update_id}}
        )

    def write(self, saved: dict[str, Any]) -> None:
        """Replace the state file's content."""
        write_file(self.file, json.dumps(saved).encode(), KEY_MODE)  # readable by its owner only
        self.saved = saved

    def worker_directory(self, worker_id: str) -> FsPath:
        """Where a worker's checkpoint lives (ValueError for an id that is no plain file name)."""
        if FsPath(worker_id).name != worker_id or worker_id in ("", ".", ".."):
            raise ValueError(f"the coordinator named a worker {worker_id!r}, which is no file name")
        return self.directory / worker_id

    def save_worker(self, worker_id: str, worker: Worker, assignment: dict[str, Any], held: Held) -> None:
        """Durably keep a worker's state after training and the update it is about to push."""
        state, meta = worker.state()
        upload, upload_meta = upload_state(held.upload)
        tensors = {
            **{f"worker/{n}": t for n, t in state.items()},
            **{f"upload/{n}": t for n, t in upload.items()},
        }
        manifest = {
            "kind": "client-worker",
            "assignment": assignment,
            "worker": meta,
            "upload": upload_meta,
            "update_id": held.update_id,
        }
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_checkpoint(self.worker_directory(worker_id), tensors, manifest)

    def restore(self, worker_id: str, worker: Worker, assignment: dict[str, Any]) -> Held | None:
        """Continue a worker from its checkpoint, if it has one of this assignment; its last update."""
        directory = self.worker_directory(worker_id)
        if not directory.exists():
            return None
        try:
            tensors, manifest = load_checkpoint(directory)
            if manifest["assignment"] != assignment:
                log.warning(
                    "%s: the saved state is of %s, not of the assignment %s: starting afresh",
                    worker_id,
                    manifest["assignment"],
                    assignment,
                )
                return None
            parts: dict[str, dict[str, torch.Tensor]] = {"worker": {}, "upload": {}}
            for name, t in tensors.items():
                kind, _, rest = name.partition("/")
                parts[kind][rest] = t
            worker.load_state(parts["worker"], manifest["worker"])
            upload = load_upload(parts["upload"], manifest["upload"])
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            log.warning("%s: cannot read its saved state (%s): starting afresh", worker_id, e)
            return None
        update_id = manifest["update_id"]
        acknowledged = self.saved.get("acknowledged", {}).get(worker_id) == update_id
        log.info(
            "%s: continues from its state after round %d (update %s%s)",
            worker_id,
            upload.round,
            update_id,
            ", acknowledged" if acknowledged else "",
        )
        return Held(upload, update_id, acknowledged)

    def remove(self) -> None:
        """Delete the state file and the workers' checkpoints beside it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.file.unlink(missing_ok=True)


@dataclass
class Session:
    """A joined client: id, token, update-signing key, the coordinator's model description, assignment."""

    client_id: str
    token: str
    model: dict[str, Any]
    assignment: pb.Assignment
    signing_key: ed25519.Ed25519PrivateKey

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token."""
        return (("authorization", f"Bearer {self.token}"),)


def connect(server: str, certs: str | None = None, cert_name: str | None = None) -> grpc.Channel:
    """A channel to `server` ("host:port"): TLS when `certs` names a `fedmoe certs` directory, presenting the
    client certificate client-<cert_name>.pem when `cert_name` is given (mutual TLS)."""
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    if certs:
        return grpc.secure_channel(server, channel_credentials(certs, cert_name), options=options)
    return grpc.insecure_channel(server, options=options)


class StreamingStub(pb_grpc.CoordinatorStub):
    """The coordinator's generated stub, its tensor streams spared copies: Pull frames read by `pull_frame`,
    Push frames sent as they are when already serialized (`push` sends them so through this stub only).
    The SDK's stub; `pull_job` and `push` take a plain generated one too."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        service = f"/{pb.DESCRIPTOR.services_by_name['Coordinator'].full_name}"
        self.Pull = channel.unary_stream(
            f"{service}/Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=pull_frame,
        )
        self.Push = channel.stream_unary(
            f"{service}/Push", request_serializer=frame_bytes, response_deserializer=pb.PushReply.FromString
        )


def pull_frame(data: bytes) -> pb.PullFrame | memoryview:
    """A Pull frame as it arrives: a chunk frame's data as a view into the message (`chunk_view`: no parse,
    no copy), any other frame parsed."""
    view = chunk_view(data)
    return pb.PullFrame.FromString(data) if view is None else view


def profile_message(profile: DeviceProfile) -> pb.DeviceProfile:
    """The wire form of a device profile."""
    return pb.DeviceProfile(
        name=profile.name,
        memory_bytes=profile.memory_bytes,
        bits=profile.bits,
        densities=list(profile.densities),
        speed=profile.speed,
    )


def describe_coordinator(stub: pb_grpc.CoordinatorStub, retry: Retry) -> tuple[dict[str, Any], str]:
    """The coordinator's model description (spec, grid, seed, shapes) and how it routes ("data" or "turn"),
    from Status, before joining."""
    reply = retry(lambda: stub.Status(pb.StatusRequest(), timeout=CALL_TIMEOUT_S), "status")
    status = json.loads(reply.json)
    return status["model"], status.get("routing", "turn")


def join(
    stub: pb_grpc.CoordinatorStub,
    profile: DeviceProfile,
    name: str,
    features: tuple[np.ndarray, float] | None,
    state: ClientState | None = None,
    retry: Retry | None = None,
    enrolment: str = "",
) -> Session:
    """Join with the routing statistics (feature sum, examples) of the client's data (paths in turn; None
    when routing by data), or rejoin as the client whose identity `state` keeps (a client that restarts
    keeps its paths and its signing key). `enrolment` is the operator's enrolment token (not needed with a
    client certificate under mutual TLS, nor to rejoin with the same key)."""
    retry = retry or Retry("coordinator")
    key = state.signing_key() if state else new_signing_key()
    request, metadata = join_request(profile, name, features, key, state, enrolment)
    reply = retry(lambda: stub.Join(request, metadata=metadata, timeout=CALL_TIMEOUT_S), "join")
    if state:
        state.save_identity(reply.client_id, reply.token, key)
    return session_of(reply, key)


def join_request(
    profile: DeviceProfile,
    name: str,
    features: tuple[np.ndarray, float] | None,
    key: ed25519.Ed25519PrivateKey,
    state: ClientState | None = None,
    enrolment: str = "",
) -> tuple[pb.JoinRequest, tuple[tuple[str, str], ...]]:
    """The JoinRequest of `join` and the metadata to send it with (a rejoin's token)."""
    client_id = state.client_id if state else ""
    metadata = (("authorization", f"Bearer {state.token}"),) if client_id else ()
    request = pb.JoinRequest(
        profile=profile_message(profile),
        name=name,
        client_id=client_id,
        public_key=public_bytes(key),
        enrolment=enrolment,
    )
    if client_id and state.saved.get("signing_key"):  # its key proves who rejoins, valid token or not
        request.proof_time = int(time.time() * 1000)
        request.proof = key.sign(rejoin_message(client_id, request.proof_time))
    if features is not None:
        feature_sum, examples = features
        request.feature_sum.extend(np.asarray(feature_sum, dtype=np.float64).tolist())
        request.examples = float(examples)
    return request, metadata


def session_of(reply: pb.JoinReply, key: ed25519.Ed25519PrivateKey) -> Session:
    """The session a JoinReply opens for the client signing with `key`."""
    return Session(reply.client_id, reply.token, json.loads(reply.model_json), reply.assignment, key)


def variant_of(message: pb.Variant) -> Variant:
    """A variant from its wire form (densities travel as float32)."""
    return Variant(message.bits, round(message.density, 6), message.scheme)


def pull_job(
    stub: pb_grpc.CoordinatorStub, session: Session, retry: Retry | None = None, worker_id: str = ""
) -> Job:
    """Pull a worker's assignment and weights for this round (worker "": the client's one path): its job (a
    width or dense sub-model's, without masks: see `Job`)."""
    retry = retry or Retry("coordinator")
    request = pb.PullRequest(client_id=session.client_id, worker_id=worker_id)

    def pulled() -> tuple[pb.Assignment, dict[str, QTensor]]:
        """The assignment and its tensors, decoded (and hashed) as their frames arrive."""
        call = stub.Pull(request, metadata=session.metadata, timeout=STREAM_TIMEOUT_S)
        frames = read_ahead(call, call.cancel)
        first = next(frames, None)
        if not isinstance(first, pb.PullFrame) or first.WhichOneof("frame") != "assignment":
            raise ValueError("the coordinator's Pull stream did not start with an assignment")
        tensor_frames = (f if isinstance(f, memoryview) else f.tensor for f in frames)
        return first.assignment, decode_tensors(tensor_frames, MAX_PULL_BYTES)

    a, tensors = retry(pulled, "pull")
    variant = variant_of(a.variant)
    inner = InnerConfig(
        steps=a.inner_steps,
        lr=a.lr,
        weight_decay=a.weight_decay,
        batch_size=a.batch_size,
        grad_clip=a.grad_clip,
    )
    return Job(Path.parse(a.path), variant, a.round, a.seed, inner, tensors)


def push(
    stub: pb_grpc.CoordinatorStub, session: Session, upload: Upload, update_id: str, worker_id: str = ""
) -> pb.PushReply:
    """Push one update of a worker; retrying it with the same `update_id` cannot count it twice. Its frames
    travel serialized, spared copies, through a `StreamingStub`; as messages through a plain one."""
    fast = isinstance(stub, StreamingStub)
    frames = push_frames(session, upload, update_id, worker_id, serialized=fast)
    return stub.Push(frames, metadata=session.metadata, timeout=STREAM_TIMEOUT_S)


def push_frames(
    session: Session,
    upload: Upload,
    update_id: str | None = None,
    worker_id: str = "",
    serialized: bool = False,
) -> Iterator[pb.PushFrame | bytes]:
    """A push of a worker's update (worker "": the client's one path): the signed header, then the tensor
    stream (each tensor hashed once, for the signature and the wire's checksum). `serialized`: the tensor
    frames as they travel (see `fedmoe.wire.encode_tensors`), which a `StreamingStub` sends as they are."""
    v = upload.variant
    update_id = update_id or uuid.uuid4().hex
    digest = update_digest(signed_fields(worker_id or session.client_id, update_id, upload), upload.tensors)
    header = pb.PushHeader(
        client_id=session.client_id,
        round=upload.round,
        path=str(upload.path),
        variant=pb.Variant(bits=v.bits, density=v.density, scheme=v.scheme),
        seed=upload.seed,
        weight=upload.weight,
        loss=upload.loss,
        update_id=update_id,
        signature=session.signing_key.sign(digest),
        worker_id=worker_id,
        evaluation=upload.evaluation,
    )
    yield pb.PushFrame(header=header)
    yield from encode_tensors(
        upload.tensors, into=pb.PushFrame, batch_bytes=CHUNK_BYTES, serialized=serialized
    )


# -- routing by data ------------------------------------------------------------------------
def proposal_arrays(reply: pb.ProposalReply) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The centroids (k x width) and prices of a proposal; None, None for the first pass."""
    if reply.first:
        return None, None
    centroids = np.asarray(reply.centroids, dtype=np.float64).reshape(reply.k, reply.width)
    return centroids, np.asarray(reply.prices, dtype=np.float64)


@dataclass
class Crew:
    """A client's workers by id, and what it needs to make them.

    Paths in turn: one worker, the client's id, on all its examples. Routing by data: one per cluster the
    coordinator gave it by its histogram, each on the client's examples of that cluster, the one marked
    `trains_router` also training the learned router on all its features and their clusters, made by
    `LocalExamples.worker` as every runner makes them. With a `state`, each worker continues from its
    saved state and holds its saved last update.
    """

    spec: Spec
    model: dict[str, Any]  # the coordinator's model description: its grid and seed
    local: LocalData
    state: ClientState | None = None  # where the workers' state is kept (None: in memory only)
    compute: Compute = field(default_factory=Compute)  # where and in what precision its workers train
    workers: dict[str, Worker] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # each worker's path
    assignments: dict[str, dict[str, Any]] = field(default_factory=dict)  # each worker's path, variant, seed
    held: dict[str, Held] = field(default_factory=dict)  # each worker's last update, until its round closed
    routing: tuple[np.ndarray, np.ndarray | None] | None = None  # the converged centroids and prices

    @cached_property
    def examples(self) -> LocalExamples:
        """The client's examples and their routing features (computed once); not for a stream of batches."""
        return LocalExamples(self.spec, self.local.train, self.local.test)

    def path_model(self, a: pb.Assignment) -> nn.Module:
        """The modules of an assignment's path, for its worker to train (the rest of the grid is never built
        here; a width sub-model's are only shapes, see `Spec.build_path`)."""
        return self.spec.build_path(Path.parse(a.path), shapes_only=variant_of(a.variant).sliced)

    def add_turn(self, client_id: str, a: pb.Assignment) -> None:
        """The worker of a client given one path at join (paths in turn)."""
        local, path = self.local, Path.parse(a.path)
        worker = Worker(
            self.spec,
            self.path_model(a),
            local.batches(a.batch_size, a.seed),
            local.weight,
            variant_of(a.variant),
            test=local.test,
            compute=self.compute,
        )
        self.workers[client_id], self.paths[client_id] = worker, path
        self.restore(client_id, a)

    def restore(self, worker_id: str, a: pb.Assignment) -> None:
        """Note a new worker's assignment and continue it from its saved state, when there is one."""
        self.assignments[worker_id] = {
            "path": a.path,
            "variant": asdict(variant_of(a.variant)),
            "seed": a.seed,
        }
        if self.state is not None:
            held = self.state.restore(worker_id, self.workers[worker_id], self.assignments[worker_id])
            if held is not None:
                self.held[worker_id] = held

    def keep(self, worker_id: str, held: Held) -> None:
        """Hold a worker's new update, and save the worker's state with it (before it is pushed)."""
        self.held[worker_id] = held
        if self.state is not None:
            self.state.save_worker(worker_id, self.workers[worker_id], self.assignments[worker_id], held)

    def acknowledge(self, worker_id: str) -> None:
        """The coordinator acknowledged (or already held) the worker's held update."""
        held = self.held[worker_id]
        held.acknowledged = True
        if self.state is not None:
            self.state.acknowledge(worker_id, held.update_id)

    def forget(self, open_round: int) -> None:
        """Drop the acknowledged updates of rounds that closed before `open_round`."""
        for worker_id, held in list(self.held.items()):
            if held.acknowledged and held.upload.round < open_round:
                del self.held[worker_id]

    def answer(self, stub: pb_grpc.CoordinatorStub, session: Session, retry: Retry) -> None:
        """Answer the open clustering proposal with this client's statistics against it."""
        request = pb.ProposalRequest(client_id=session.client_id)
        reply = retry(
            lambda: stub.Proposal(request, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "proposal"
        )
        if reply.converged:
            return
        stats = cluster_stats(self.examples.features, *proposal_arrays(reply), reply.softness, reply.products)
        report = pb.ClusterReport(
            client_id=session.client_id,
            pass_number=reply.pass_number,
            counts=stats.counts.tolist(),
            sums=stats.sums.reshape(-1).tolist(),
            squares=stats.squares.reshape(-1).tolist(),
            soft=[] if stats.soft is None else stats.soft.tolist(),
            products=[] if stats.products is None else upper_triangles(stats.products).tolist(),
        )
        try:
            retry(lambda: stub.Cluster(report, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "cluster")
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                raise
            log.info("clustering pass %d: answer not used (%s)", reply.pass_number, e.details())

    def assign(self, stub: pb_grpc.CoordinatorStub, session: Session, retry: Retry) -> bool:
        """Send the histogram of this client's examples over the converged clusters and make the workers
        it is given; False while clustering runs or the coordinator holds the histogram."""
        if self.routing is None:
            request = pb.ProposalRequest(client_id=session.client_id)
            reply = retry(
                lambda: stub.Proposal(request, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "proposal"
            )
            if not reply.converged:
                return False
            self.routing = proposal_arrays(reply)
        request = pb.AssignRequest(
            client_id=session.client_id, histogram=histogram(self.examples.features, *self.routing).tolist()
        )
        reply = retry(
            lambda: stub.Assign(request, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "assign"
        )
        if not reply.workers:
            return False
        for w in reply.workers:
            if w.worker_id in self.workers:
                continue
            a, path = w.assignment, Path.parse(w.assignment.path)
            self.paths[w.worker_id] = path
            self.workers[w.worker_id] = self.examples.worker(
                self.path_model(a),
                variant_of(a.variant),
                a.seed,
                a.batch_size,
                w.cluster,
                self.routing,
                w.trains_router,
                self.compute,
            )
            self.restore(w.worker_id, a)
            log.info(
                "worker %s: path %s, variant %s, %d examples of cluster %d",
                w.worker_id,
                a.path,
                variant_of(a.variant).name,
                self.workers[w.worker_id].weight,
                w.cluster,
            )
        return True


def check_by_data(local: LocalData, weight: float | None, server: str) -> None:
    """Raise ValueError unless this client's data can be routed by data: examples, not a stream, and no
    weight of its own (each worker weighs its examples of its cluster)."""
    if local.train is None:
        raise ValueError(
            f"the coordinator at {server} routes by data (routing.assign = 'data'): give your examples "
            "(ClientData, Examples or (inputs, targets)), not a stream of batches: each path trains on "
            "your examples of its cluster"
        )
    if weight is not None:
        raise ValueError(
            f"the coordinator at {server} routes by data (routing.assign = 'data'): each path weighs your "
            "examples of its cluster; drop weight="
        )


# -- the client ------------------------------------------------------------------------------
def run(
    server: str,
    spec: Spec | str | None = None,
    profile: str | DeviceProfile = "fp32",
    data: Any = None,
    weight: float | None = None,
    certs: str | None = None,
    name: str = "",
    state_file: str | None = None,
    enrolment: str | None = None,
    cert_name: str | None = None,
    partition: int = 0,
    partitions: int = 1,
    retry_s: float = 120.0,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
    device: str = "auto",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Join the federation at `server` ("host:port") and train the assigned path(s) every round until done.

    - `spec`: a `Spec` or its import string; None: the coordinator's, loaded by its import string (it must be
      importable here). Its grid must match the coordinator's parameter for parameter.
    - `profile`: a name from `fedmoe.assignment.PROFILES` or a `DeviceProfile`.
    - `data`: None (the spec's `data(partition, partitions)`), a `ClientData` (its train split trains, its
      test split evaluates each trained path), `Examples`, or an (inputs, targets) tuple of tensors: fedmoe
      samples the batches, the weight is the number of examples and the routing statistics are exact. Or,
      when paths go in turn, an endless iterator of (inputs, targets) batches: then `weight` (the number
      of examples behind it) is required, and the routing statistics are the mean features of its first
      batch, counted as `weight` examples.
    - `weight`: the client's weight in the average (default: its number of examples; paths in turn only).
    - `certs`: a `fedmoe certs` directory when the coordinator speaks TLS. `state_file` keeps this client's
      identity and signing key, and beside it each worker's state and last update (see `ClientState`): a
      client restarted with it rejoins as itself with no enrolment token, sends again an update the
      coordinator did not acknowledge or lost (with its id: it counts once) and trains on from where it
      stopped. Without it, all of that lives in memory only.
    - `enrolment`: the operator's enrolment token, needed to join (default: $FEDMOE_ENROLMENT_TOKEN, else the
      enrolment.token of `certs`); or, under mutual TLS, `cert_name`: present the client certificate
      client-<cert_name>.pem of `certs`.
    - `device` ("auto": cuda, else mps, else cpu) and `precision` ("fp32", "bf16", "fp16" on CUDA): where and
      how this machine trains (see `fedmoe.train.Compute`); what it sends is the same fp32-derived update.
    - `retry_s`: how long an unreachable coordinator is retried (a WARNING per retry) before ConnectionError;
      `timeout_s`: an overall limit (None: none). `poll_s`: the least time between two heartbeats while
      waiting (the coordinator holds a heartbeat until there is something to do, up to `HOLD_S`).

    Raises TypeError/ValueError, naming the fix, for anything wrong that can be found before joining.
    Returns a summary: client id, spec, routing, path(s), variant, examples (weight), rounds trained, bytes
    uploaded, and per worker its path, variant, examples and rounds.
    """
    server = check_address(server)
    compute = Compute.of(device, precision)
    device = resolve_profile(profile)
    weight = resolve_weight(weight)
    check_data_form(data)
    spec = load_spec(spec) if spec is not None else None
    local = prepare_data(spec, data, weight, partition, partitions) if spec is not None else None
    retry = Retry(server, retry_s, math.inf if timeout_s is None else time.monotonic() + timeout_s)
    if enrolment is None:
        enrolment = given_enrolment(certs)
    with connect(server, certs, cert_name) as channel:
        stub = StreamingStub(channel)
        model, routing = describe_coordinator(stub, retry)
        if spec is None:
            if not model["spec"]:
                raise ValueError(
                    f"the coordinator at {server} runs a spec without an import string: "
                    "pass spec= (the same Spec)"
                )
            spec = load_spec(model["spec"])
        check_model(spec, model)
        local = local or prepare_data(spec, data, weight, partition, partitions)
        by_data = routing == "data"
        if by_data:
            check_by_data(local, weight, server)
        state = ClientState(state_file) if state_file else None
        features = None
        if not by_data:
            feature_sum = local.feature_sum
            if feature_sum is None:
                feature_sum = spec.feature_statistics(local.train)[0]
            features = (feature_sum, local.examples)
        session = join(stub, device, name, features, state, retry, enrolment)
        check_model(spec, session.model)
        crew = Crew(spec, model, local, state, compute)
        if by_data:
            log.info(
                "joined %s as %s: paths by data, %d examples", server, session.client_id, len(local.train)
            )
        else:
            crew.add_turn(session.client_id, session.assignment)
            a = session.assignment
            log.info(
                "joined %s as %s: path %s, variant %s, %g examples",
                server,
                session.client_id,
                a.path,
                variant_of(a.variant).name,
                local.weight,
            )
        trained, uploaded = train_until_done(stub, session, crew, retry, poll_s, timeout_s)
    workers = [
        {
            "worker_id": worker_id,
            "path": str(crew.paths[worker_id]),
            "variant": worker.variant.name,
            "examples": worker.weight,
            "rounds": trained.get(worker_id, []),
        }
        for worker_id, worker in crew.workers.items()
    ]
    return {
        "client_id": session.client_id,
        "spec": spec.ref,
        "routing": routing,
        "path": ",".join(w["path"] for w in workers),
        "variant": workers[0]["variant"] if workers else "",
        "examples": sum(w["examples"] for w in workers),
        "rounds": sorted(set().union(*(w["rounds"] for w in workers))),
        "upload_bytes": uploaded,
        "workers": workers,
    }


def leave(
    server: str,
    state_file: str | os.PathLike[str],
    certs: str | None = None,
    cert_name: str | None = None,
    retry_s: float = 120.0,
) -> str:
    """Leave the federation at `server` as the client whose identity `state_file` keeps: the coordinator
    stops counting it in its quorum and revokes its tokens. Deletes the state file and the workers' state
    beside it (they name a member that is gone). Returns the client's id."""
    server = check_address(server)
    state = ClientState(state_file)
    if not state.client_id:
        raise ValueError(f"{state_file} holds no client identity: there is nothing to leave")
    request = pb.LeaveRequest(client_id=state.client_id)
    metadata = (("authorization", f"Bearer {state.token}"),)
    with connect(server, certs, cert_name) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        Retry(server, retry_s)(
            lambda: stub.Leave(request, metadata=metadata, timeout=CALL_TIMEOUT_S), "leave"
        )
    state.remove()
    log.info("%s left the federation at %s", state.client_id, server)
    return state.client_id


def train_until_done(
    stub: pb_grpc.CoordinatorStub,
    session: Session,
    crew: Crew,
    retry: Retry,
    poll_s: float,
    timeout_s: float | None,
) -> tuple[dict[str, list[int]], int]:
    """Heartbeat and do as told until told done: answer clustering proposals, send the histogram, and send an
    update of each worker the open round lacks. The rounds each worker sent an update of, bytes sent."""
    trained: dict[str, list[int]] = {}
    uploaded = 0
    actions = pb.HeartbeatReply
    while True:
        asked = time.monotonic()
        if asked > retry.deadline:
            raise TimeoutError(f"training did not finish within {timeout_s:g} s (timeout_s)")
        hold = min(HOLD_S, retry.deadline - asked)
        heartbeat = pb.HeartbeatRequest(client_id=session.client_id, wait_s=hold)
        call = functools.partial(
            stub.Heartbeat, heartbeat, metadata=session.metadata, timeout=CALL_TIMEOUT_S + hold
        )
        beat = retry(call, "heartbeat")
        if beat.action == actions.DONE:
            return trained, uploaded
        crew.forget(beat.round)
        if beat.action == actions.CLUSTER:
            crew.answer(stub, session, retry)
            continue
        todo = list(beat.workers) if beat.action == actions.TRAIN else []
        if beat.action == actions.ASSIGN or any(w not in crew.workers for w in todo):
            if not crew.assign(stub, session, retry):
                time.sleep(poll_s)
            continue
        if not todo:  # a WAIT answered early (the coordinator did not hold it): not again at once
            time.sleep(max(0.0, asked + poll_s - time.monotonic()))
            continue
        for worker_id in todo:
            sent = send_update(stub, session, crew, worker_id, beat.round, retry, trained)
            if sent is None:
                time.sleep(poll_s)
            uploaded += sent or 0


def send_update(
    stub: pb_grpc.CoordinatorStub,
    session: Session,
    crew: Crew,
    worker_id: str,
    open_round: int,
    retry: Retry,
    trained: dict[str, list[int]],
) -> int | None:
    """Send an update of a worker that `open_round` lacks: the update it holds when that one was never
    acknowledged, or was for this round (the coordinator lost it), with its id; else a new one (pull, train,
    keep, then push). Record its round in `trained`. The bytes sent; None when the coordinator answered that
    it already holds this update although it asked for one."""
    held = crew.held.get(worker_id)
    if held is None or held.acknowledged and held.upload.round != open_round:
        worker = crew.workers[worker_id]
        upload = worker.train_round(pull_job(stub, session, retry, worker_id))
        held = Held(upload, uuid.uuid4().hex)  # one id for every send of this update, restarts included
        crew.keep(worker_id, held)
    else:
        log.info(
            "round %d: sending again update %s of %s (%s)",
            held.upload.round,
            held.update_id,
            worker_id,
            "the coordinator lost it" if held.acknowledged else "not acknowledged",
        )
    upload = held.upload
    try:
        reply = retry(functools.partial(push, stub, session, upload, held.update_id, worker_id), "push")
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
            raise
        log.info(
            "round %d: update %s of %s not used (%s)", upload.round, held.update_id, worker_id, e.details()
        )
        resent = held.acknowledged
        crew.acknowledge(worker_id)  # the coordinator holds it, or will never count it
        return None if resent and e.code() == grpc.StatusCode.ALREADY_EXISTS else 0
    crew.acknowledge(worker_id)
    rounds = trained.setdefault(worker_id, [])
    if upload.round not in rounds:
        rounds.append(upload.round)
    log.info(
        "round %d: %s loss %.4f, sent %d bytes; round %d is open",
        upload.round,
        worker_id,
        upload.loss,
        upload.nbytes,
        reply.round,
    )
    return upload.nbytes
