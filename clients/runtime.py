"""The client SDK: join a coordinator with your data, then pull, train and push each round until it is done.

    from fedmoe.clients import run
    run("coordinator.example:7000", "mypkg.problem:spec", "int8", data=(inputs, targets), certs="certs")

`run` checks what it can before it joins, and each error names the fix: the server address, the device
profile, the form of `data`, the first batch against the spec (two tensors, target dtype, an input shape
the model accepts, labels in range for classifiers) and the model against the coordinator's (parameter
names and shapes). An unreachable coordinator is retried with a WARNING per attempt for `retry_s` seconds.
The client trains with the same `fedmoe.worker.Worker` as every other runner.

When the coordinator routes by data (routing.assign = "data"), the client computes its examples' routing
features once, answers the federated k-means proposals with their per-cluster statistics, sends the
histogram of its examples over the converged clusters, and trains one worker per cluster it was given,
each on its examples of that cluster, exactly as `fedmoe.federation.enrol` does in process. Nothing but
those aggregates, outer gradients and metrics leaves it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path as FsPath
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from torch import nn

from fedmoe.assignment import PROFILES, DeviceProfile
from fedmoe.clustering import cluster_stats, histogram
from fedmoe.config import InnerConfig
from fedmoe.ensemble import describe_mismatch
from fedmoe.modular import ModularModel, Path
from fedmoe.security import channel_credentials, new_signing_key, public_bytes, update_digest
from fedmoe.spec import Batch, ClientData, Examples, Spec, cross_entropy, load_spec
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc
from fedmoe.wire import decode_tensors, encode_tensors
from fedmoe.worker import Job, LocalExamples, Upload, Variant, Worker, round_masks, signed_fields

log = logging.getLogger("fedmoe.client")
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
SCHEMES = ("http://", "https://", "grpc://", "grpcs://")
MAX_PULL_BYTES = 4 << 30
CALL_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 600.0
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


def check_model(spec: Spec, model: dict[str, Any], grid: ModularModel) -> None:
    """Raise ValueError unless `grid` (this client's build) has the coordinator's parameters and shapes."""
    expected = {k: {n: tuple(s) for n, s in d.items()} for k, d in model["shapes"].items()}
    found = {k: {n: tuple(t.shape) for n, t in d.items()} for k, d in grid.module_states().items()}
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
        """Run `call`, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff and a WARNING per retry."""
        delay, since = 0.5, None
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
                delay = min(2 * delay, 10.0)


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


def connect(server: str, certs: str | None = None) -> grpc.Channel:
    """A channel to `server` ("host:port"): TLS when `certs` names a `fedmoe certs` directory."""
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    if certs:
        return grpc.secure_channel(server, channel_credentials(certs), options=options)
    return grpc.insecure_channel(server, options=options)


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
    state_file: FsPath | None = None,
    retry: Retry | None = None,
) -> Session:
    """Join with the routing statistics (feature sum, examples) of the client's data (paths in turn; None
    when routing by data), or rejoin with the identity in `state_file` (a client that restarts keeps its
    paths)."""
    retry = retry or Retry("coordinator")
    saved = json.loads(state_file.read_text()) if state_file and state_file.exists() else {}
    metadata = (("authorization", f"Bearer {saved['token']}"),) if saved else ()
    key = new_signing_key()  # a fresh key per process: the private key never leaves memory
    request = pb.JoinRequest(
        profile=profile_message(profile),
        name=name,
        client_id=saved.get("client_id", ""),
        public_key=public_bytes(key),
    )
    if features is not None:
        feature_sum, examples = features
        request.feature_sum.extend(np.asarray(feature_sum, dtype=np.float64).tolist())
        request.examples = float(examples)
    reply = retry(lambda: stub.Join(request, metadata=metadata, timeout=CALL_TIMEOUT_S), "join")
    if state_file:
        state_file.write_text(json.dumps({"client_id": reply.client_id, "token": reply.token}))
        state_file.chmod(0o600)
    return Session(reply.client_id, reply.token, json.loads(reply.model_json), reply.assignment, key)


def variant_of(message: pb.Variant) -> Variant:
    """A variant from its wire form (densities travel as float32)."""
    return Variant(message.bits, round(message.density, 6), message.scheme)


def pull_job(
    stub: pb_grpc.CoordinatorStub,
    session: Session,
    path_model: nn.Module,
    retry: Retry | None = None,
    worker_id: str = "",
) -> Job:
    """Pull a worker's assignment and weights for this round (worker "": the client's one path): the job,
    its masks recomputed from (variant, round, seed)."""
    retry = retry or Retry("coordinator")
    request = pb.PullRequest(client_id=session.client_id, worker_id=worker_id)
    frames = retry(
        lambda: list(stub.Pull(request, metadata=session.metadata, timeout=STREAM_TIMEOUT_S)), "pull"
    )
    if not frames or frames[0].WhichOneof("frame") != "assignment":
        raise ValueError("the coordinator's Pull stream did not start with an assignment")
    a = frames[0].assignment
    tensors = decode_tensors((f.tensor for f in frames[1:]), MAX_PULL_BYTES)
    variant = variant_of(a.variant)
    inner = InnerConfig(
        steps=a.inner_steps,
        lr=a.lr,
        weight_decay=a.weight_decay,
        batch_size=a.batch_size,
        grad_clip=a.grad_clip,
    )
    masks = round_masks(path_model, variant, a.round, a.seed)
    return Job(Path.parse(a.path), variant, a.round, a.seed, inner, tensors, masks)


def push(
    stub: pb_grpc.CoordinatorStub, session: Session, upload: Upload, update_id: str, worker_id: str = ""
) -> pb.PushReply:
    """Push one update of a worker; retrying it with the same `update_id` cannot count it twice."""
    frames = push_frames(session, upload, update_id, worker_id)
    return stub.Push(frames, metadata=session.metadata, timeout=STREAM_TIMEOUT_S)


def push_frames(
    session: Session, upload: Upload, update_id: str | None = None, worker_id: str = ""
) -> Iterator[pb.PushFrame]:
    """A push of a worker's update (worker "": the client's one path): the signed header, then the tensor
    stream."""
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
    for frame in encode_tensors(upload.tensors):
        yield pb.PushFrame(tensor=frame)


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
    `LocalExamples.worker` as every runner makes them.
    """

    spec: Spec
    model: dict[str, Any]  # the coordinator's model description: its grid and seed
    local: LocalData
    grid: ModularModel | None = None  # the client's build of the grid, until its workers are made
    workers: dict[str, Worker] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # each worker's path
    routing: tuple[np.ndarray, np.ndarray | None] | None = None  # the converged centroids and prices

    @cached_property
    def examples(self) -> LocalExamples:
        """The client's examples and their routing features (computed once); not for a stream of batches."""
        return LocalExamples(self.spec, self.local.train, self.local.test)

    def path_model(self, path: Path) -> nn.Module:
        """A copy of one path of the grid, for a worker to train."""
        if self.grid is None:
            self.grid = self.spec.build(self.model["grid"], self.model["seed"])
        return copy.deepcopy(self.grid.compose(path))

    def add_turn(self, client_id: str, a: pb.Assignment) -> None:
        """The worker of a client given one path at join (paths in turn)."""
        local, path = self.local, Path.parse(a.path)
        worker = Worker(
            self.spec,
            self.path_model(path),
            local.batches(a.batch_size, a.seed),
            local.weight,
            variant_of(a.variant),
            test=local.test,
        )
        self.workers[client_id], self.paths[client_id] = worker, path
        self.grid = None  # the client keeps only its paths

    def answer(self, stub: pb_grpc.CoordinatorStub, session: Session, retry: Retry) -> None:
        """Answer the open clustering proposal with this client's statistics against it."""
        request = pb.ProposalRequest(client_id=session.client_id)
        reply = retry(
            lambda: stub.Proposal(request, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "proposal"
        )
        if reply.converged:
            return
        stats = cluster_stats(self.examples.features, *proposal_arrays(reply), reply.softness)
        report = pb.ClusterReport(
            client_id=session.client_id,
            pass_number=reply.pass_number,
            counts=stats.counts.tolist(),
            sums=stats.sums.reshape(-1).tolist(),
            squares=stats.squares.reshape(-1).tolist(),
            soft=[] if stats.soft is None else stats.soft.tolist(),
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
                self.path_model(path),
                variant_of(a.variant),
                a.seed,
                a.batch_size,
                w.cluster,
                self.routing,
                w.trains_router,
            )
            log.info(
                "worker %s: path %s, variant %s, %d examples of cluster %d",
                w.worker_id,
                a.path,
                variant_of(a.variant).name,
                self.workers[w.worker_id].weight,
                w.cluster,
            )
        self.grid = None  # the client keeps only its paths
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
    partition: int = 0,
    partitions: int = 1,
    retry_s: float = 120.0,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
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
      identity, so that it rejoins as itself after a restart.
    - `retry_s`: how long an unreachable coordinator is retried (a WARNING per retry) before ConnectionError;
      `timeout_s`: an overall limit (None: none). `poll_s`: the wait between heartbeats while waiting.

    Raises TypeError/ValueError, naming the fix, for anything wrong that can be found before joining.
    Returns a summary: client id, spec, routing, path(s), variant, examples (weight), rounds trained, bytes
    uploaded, and per worker its path, variant, examples and rounds.
    """
    server = check_address(server)
    device = resolve_profile(profile)
    weight = resolve_weight(weight)
    check_data_form(data)
    spec = load_spec(spec) if spec is not None else None
    local = prepare_data(spec, data, weight, partition, partitions) if spec is not None else None
    retry = Retry(server, retry_s, math.inf if timeout_s is None else time.monotonic() + timeout_s)
    with connect(server, certs) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        model, routing = describe_coordinator(stub, retry)
        if spec is None:
            if not model["spec"]:
                raise ValueError(
                    f"the coordinator at {server} runs a spec without an import string: "
                    "pass spec= (the same Spec)"
                )
            spec = load_spec(model["spec"])
        grid = spec.build(model["grid"], model["seed"])
        check_model(spec, model, grid)
        local = local or prepare_data(spec, data, weight, partition, partitions)
        by_data = routing == "data"
        if by_data:
            check_by_data(local, weight, server)
        saved = FsPath(state_file) if state_file else None
        features = None
        if not by_data:
            feature_sum = local.feature_sum
            if feature_sum is None:
                feature_sum = spec.feature_statistics(local.train)[0]
            features = (feature_sum, local.examples)
        session = join(stub, device, name, features, saved, retry)
        check_model(spec, session.model, grid)
        crew = Crew(spec, model, local, grid)
        del grid  # the crew keeps it until its workers are made, then only their paths
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


def train_until_done(
    stub: pb_grpc.CoordinatorStub,
    session: Session,
    crew: Crew,
    retry: Retry,
    poll_s: float,
    timeout_s: float | None,
) -> tuple[dict[str, list[int]], int]:
    """Heartbeat and do as told until told done: answer clustering proposals, send the histogram, and pull,
    train and push each worker the open round lacks. The rounds each worker trained, bytes sent."""
    trained: dict[str, list[int]] = {}
    uploaded = 0
    heartbeat = pb.HeartbeatRequest(client_id=session.client_id)
    actions = pb.HeartbeatReply
    while True:
        if time.monotonic() > retry.deadline:
            raise TimeoutError(f"training did not finish within {timeout_s:g} s (timeout_s)")
        beat = retry(
            lambda: stub.Heartbeat(heartbeat, metadata=session.metadata, timeout=CALL_TIMEOUT_S), "heartbeat"
        )
        if beat.action == actions.DONE:
            return trained, uploaded
        if beat.action == actions.CLUSTER:
            crew.answer(stub, session, retry)
            continue
        todo = list(beat.workers) if beat.action == actions.TRAIN else []
        if beat.action == actions.ASSIGN or any(w not in crew.workers for w in todo):
            if not crew.assign(stub, session, retry):
                time.sleep(poll_s)
            continue
        if not todo:
            time.sleep(poll_s)
            continue
        for worker_id in todo:
            uploaded += train_worker(stub, session, crew.workers[worker_id], worker_id, retry, trained)


def train_worker(
    stub: pb_grpc.CoordinatorStub,
    session: Session,
    worker: Worker,
    worker_id: str,
    retry: Retry,
    trained: dict[str, list[int]],
) -> int:
    """Pull, train and push one worker's round; record the round in `trained`. The bytes sent."""
    upload = worker.train_round(pull_job(stub, session, worker.path_model, retry, worker_id))
    update_id = uuid.uuid4().hex  # the same id on every retry: a stored update is not counted twice
    try:
        reply = retry(functools.partial(push, stub, session, upload, update_id, worker_id), "push")
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
            raise
        log.info("round %d: update of %s not used (%s)", upload.round, worker_id, e.details())
        return 0
    trained.setdefault(worker_id, []).append(upload.round)
    log.info(
        "round %d: %s loss %.4f, sent %d bytes; round %d is open",
        upload.round,
        worker_id,
        upload.loss,
        upload.nbytes,
        reply.round,
    )
    return upload.nbytes
