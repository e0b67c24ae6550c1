"""The coordinator: the round engine behind a network, with membership, durable state and a round policy.

`Coordinator` drives a `fedmoe.engine.Engine` and is free of gRPC; `server.service` exposes it over gRPC.
The engine assigns paths and variants, makes each round's jobs, decodes uploads, aggregates and builds
the ensemble; the coordinator adds what a network needs: members who come and go (and sign their
updates), rounds that close at a quorum or a deadline (`config.policy`), late updates, and a state
directory. Every accepted update is written there before it is acknowledged and every closed round is
checkpointed, so a restarted coordinator resumes where it stopped and applies each acknowledged update
exactly once. A stored update is folded into the round's aggregation at once, in arrival order (kept with
it, so a restart folds them in the same order): for the mean the coordinator holds running sums, one grid
whatever the number of updates. A member with nothing to do may wait in a held heartbeat (`hold`),
answered when there is something. The coordinator never loads training data: it evaluates only on the
spec's `eval_data`.

Routing by data (`routing.assign = "data"`): members join with nothing of their data. Once
`policy.min_clients` joined, federated k-means runs over them, one pass at a time: every clustering
member answers the open proposal with its `ClusterStats`, and the pass closes when all answered, their
statistics summed in join order (or at `policy.deadline_s` with at least one answer: the silent ones
leave the clustering). Then each member sends its histogram over the clusters; the histograms of the
clustering members are held until all of them arrived (or the deadline) and assigned in join order, so
that seeds and the first round do not depend on who was fastest; a member that joins later is assigned
on arrival. A member has a worker ("<client id>.<cluster>") per cluster it holds enough examples of, and
rounds count workers. A restart during clustering starts it again; converged clustering is durable.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch

from fedmoe.aggregate import update_norm
from fedmoe.assignment import DeviceProfile, assign_variant
from fedmoe.checkpoint import (
    CheckpointError,
    GroupSync,
    Spool,
    load_checkpoint,
    load_latest,
    load_records,
    save_checkpoint,
    save_records,
)
from fedmoe.clustering import ClusterStats, check_histogram, from_upper_triangles
from fedmoe.compress.quant import QTensor
from fedmoe.config import Config
from fedmoe.engine import NETWORK_SCHEMES, Assignment, Engine, Received
from fedmoe.faults import crash_point
from fedmoe.outer import Update
from fedmoe.security import AuthError, rejoin_message, update_digest, verify_signature
from fedmoe.spec import Spec, load_spec
from fedmoe.wire import tensor_digest
from fedmoe.worker import Job, Upload, signed_fields, stored_upload, upload_meta

log = logging.getLogger("fedmoe.server")
RESUME_KEYS = ("spec", "grid", "seed")  # what a state directory must share with the config to be resumed
MAX_EVALUATION_ITEMS = 64  # metrics an upload's evaluation may carry
PUBLIC_KEY_BYTES = 32  # a raw Ed25519 public key
MAX_NAME = 64  # characters of a client's name kept for logs and status
PROOF_WINDOW_MS = 5 * 60 * 1000  # how far a rejoin proof's time may be from the coordinator's clock
IDENTIFIER = re.compile(r"[A-Za-z0-9._-]{1,64}")  # client, worker and update ids
PENDING = "pending"  # the state directory's folder of the stored updates of the rounds still open or needed
UPDATE_SUFFIX = ".update"  # a stored update's file: r<round>-<worker id>.update
MAX_HOLD_S = 60.0  # the longest a heartbeat is held waiting for something to do
ACTIVE_RECOUNT_S = 0.1  # how stale the count of active workers a round's quorum uses may be


def shown(text: object, limit: int = MAX_NAME) -> str:
    """Text a client sent, as it may appear in logs, status and replies: at most `limit` characters, control
    and other unprintable characters escaped (a name cannot forge log lines)."""
    text = str(text)[: limit + 1]
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped[:limit] + ("..." if len(escaped) > limit else "")


def check_identifier(kind: str, value: str) -> str:
    """`value` if it is an id as fedmoe makes them (1 to 64 letters, digits, ".", "_", "-"), else
    INVALID_ARGUMENT."""
    if not IDENTIFIER.fullmatch(value):
        raise Rejected("INVALID_ARGUMENT", f"{kind} {shown(value)!r} is not 1 to 64 of A-Z a-z 0-9 . _ -")
    return value


class Rejected(Exception):
    """A request the coordinator refuses; `code` names the gRPC status (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass
class Member:
    """A client as the coordinator knows it (its path, variant and seed are in `engine.assignments`)."""

    client_id: str
    name: str
    profile: str
    public_key: str  # hex of the raw Ed25519 key its updates are signed with, pinned at enrolment
    last_seen: float = 0.0
    device: dict[str, Any] = field(default_factory=dict)  # its DeviceProfile, for assignment by data
    epoch: int = 0  # counts the tokens issued to it: only a token of the current epoch is valid
    left: bool = False  # it called Leave: it no longer counts in the quorum and holds no valid token
    proof_time: int = 0  # the time (unix ms) of its last rejoin proof: a proof is never accepted twice

    def to_dict(self) -> dict[str, Any]:
        """Its fields as JSON (a shallow copy: `dataclasses.asdict` deep-copies, and a state of a thousand
        members is saved at every round)."""
        return dict(self.__dict__)

    @property
    def token_subject(self) -> str:
        """What its current token names: "<client id>/<epoch>"."""
        return f"{self.client_id}/{self.epoch}"

    @property
    def device_profile(self) -> DeviceProfile:
        """The device profile it joined with."""
        d = self.device
        return DeviceProfile(d["name"], d["memory_bytes"], d["bits"], tuple(d["densities"]), d["speed"])


@dataclass(eq=False)
class Waiter:
    """A held heartbeat: `wake()` is called (under the lock) once its `answer` is known; `due` is when a
    deadline of the policy may change what it is told (`time.monotonic()`)."""

    wake: Callable[[], None]
    answer: tuple[str, list[str]] | None = None
    due: float = math.inf


@dataclass(frozen=True)
class Proposal:
    """The proposal clustering members answer (pass `number`), or the converged clustering."""

    number: int
    centroids: np.ndarray | None  # None: the first pass, one cluster
    prices: np.ndarray | None
    softness: float
    products: bool  # clients also send their second moments
    converged: bool


def model_description(engine: Engine) -> dict[str, Any]:
    """What a client needs to build the same model: the spec's import string, grid, seed, parameter shapes."""
    states = engine.model.module_states()
    shapes = {key: {name: list(t.shape) for name, t in state.items()} for key, state in states.items()}
    config = engine.config
    return {"spec": engine.spec.ref, "grid": list(config.grid), "seed": config.seed, "shapes": shapes}


class Coordinator:
    """Rounds of the engine fed by clients' uploads over a network; persisted in `state_dir`.

    `spec` defaults to `load_spec(config.spec)`. Raises ValueError for a config that cannot run over the
    network (magnitude pruning) or a state directory of another federation.
    """

    def __init__(
        self,
        config: Config,
        state_dir: str | FsPath,
        spec: Spec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        scheme = config.compression.scheme
        if scheme not in NETWORK_SCHEMES:
            raise ValueError(
                f"compression.scheme {scheme!r} cannot run over the network: its masks depend on weights a "
                f"pruned client never receives; choose one of {', '.join(NETWORK_SCHEMES)} "
                "(--set compression.scheme=rolling)"
            )
        self.config, self.clock = config, clock
        self.state_dir = FsPath(state_dir)
        self.spec = spec or load_spec(config.spec)
        self.engine = Engine(self.spec, config)
        self.model = model_description(self.engine)
        self.lock = threading.RLock()
        self.members: dict[str, Member] = {}
        # the open round's updates, folded into `aggregation` as they become durable, in that order: per
        # worker what the round's close needs besides (see `Received`), and the update's id
        self.pending: dict[str, tuple[Received, str]] = {}
        self.aggregation = self.engine.aggregation()
        # updates being stored (arrival number: worker id), and those stored that wait for an earlier
        # arrival to be stored before they are folded in: every restart folds them in the same order
        self.storing: dict[int, str] = {}
        self.stored: dict[int, tuple[str, str, Upload, Update]] = {}
        self.arrivals = 0  # arrival numbers handed out in the open round
        self.waiting: dict[str, Waiter] = {}  # members whose heartbeat is held, answered by `changed`
        # the state on disk: versions count its changes; one checkpoint write at a time (`writing`), and
        # `written` tells those waiting for one (see `wait_saved`)
        self.version = self.saved_version = 0
        self.saving = False
        self.opening = 0  # the state version a closed round waits for before the next opens (0: none)
        self.active_count: tuple[int, float, int] | None = None  # see `active_workers`
        self.writing = threading.Lock()
        self.group = GroupSync(self.state_dir)  # pending updates stored together share one flush
        Spool.remove_spools(self.state_dir / PENDING)  # pushes a stopped coordinator never acknowledged
        self.written = threading.Condition(self.lock)
        self.seen_updates: set[str] = set()
        self.metrics: list[dict[str, Any]] = []
        self.told_done: set[str] = set()
        self.round_opened = clock()
        # routing by data, while clustering: its members in join order, this pass's answers, each
        # member's example count (the same every pass)
        self.clustering: list[str] = []
        self.answers: dict[str, ClusterStats] = {}
        self.passes = 0
        self.pass_opened = clock()
        self.cluster_counts: dict[str, float] = {}
        # once converged: the members that took part and their counts; the members whose histograms are
        # awaited before any is assigned (empty once assigned), and the histograms held meanwhile
        self.clustered: dict[str, float] = {}
        self.barrier: list[str] = []
        self.held: dict[str, np.ndarray] = {}
        self.barrier_opened = clock()
        self.resume()
        self.start_clustering()

    @property
    def round(self) -> int:
        """The open round (0-based); equals `config.rounds` when training has finished."""
        return self.engine.round

    @property
    def finished(self) -> bool:
        """All rounds are done."""
        return self.engine.finished

    @property
    def dismissed(self) -> bool:
        """Finished, and every member has been told so."""
        return self.finished and self.told_done >= {c for c, m in self.members.items() if not m.left}

    # -- membership -------------------------------------------------------------------------
    def join(
        self,
        profile: DeviceProfile,
        name: str = "",
        client_id: str = "",
        public_key: bytes = b"",
        feature_sum: np.ndarray | None = None,
        examples: float = 0.0,
        enrolled: bool = False,
    ) -> Member:
        """Admit a client, or re-admit it; every (re)join moves the member to a new token epoch (its older
        tokens stop being valid).

        `enrolled`: the caller presented the enrolment credential (the operator's token, or a client
        certificate under mutual TLS). A new member needs it (UNAUTHENTICATED), and the federation must have
        room (`membership.max_members`, RESOURCE_EXHAUSTED). `public_key` (raw Ed25519, 32 bytes) is the key
        every update of the client is signed with, pinned at enrolment: a member rejoining with another key
        needs the credential again (PERMISSION_DENIED).

        Paths in turn: a new client must send `feature_sum` (the sum of its examples' routing features) and
        `examples` (their number), and is given a path and a variant that fits. Routing by data: it sends
        neither (its paths come from its histogram once clustering converged; see `assign`), and its profile
        must hold a path. A rejoining client may bring fresh statistics (in turn).

        Returns once the member is in the durable state (joins that arrive together share one write).
        """
        member, version = self.admit(profile, name, client_id, public_key, feature_sum, examples, enrolled)
        self.wait_saved(version)
        return member

    def admit(
        self,
        profile: DeviceProfile,
        name: str,
        client_id: str,
        public_key: bytes,
        feature_sum: np.ndarray | None,
        examples: float,
        enrolled: bool,
    ) -> tuple[Member, int]:
        """`join` until the member is admitted in memory: the member, and the state version that holds it."""
        by_data = self.engine.kmeans is not None
        sent_features = feature_sum is not None and len(feature_sum) > 0
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise Rejected(
                "INVALID_ARGUMENT",
                f"public_key is a raw Ed25519 key of {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}: every "
                "update is signed with it; update the client",
            )
        name = shown(name or profile.name)
        if by_data and sent_features:
            raise Rejected(
                "INVALID_ARGUMENT",
                "this federation routes by data (routing.assign = 'data'): a client joins without routing "
                "statistics and answers clustering proposals; update the client",
            )
        with self.lock:
            if client_id:
                member = self.member(client_id)
                if public_key.hex() != member.public_key:
                    if not enrolled:
                        raise Rejected(
                            "PERMISSION_DENIED",
                            f"client {client_id} rejoins with another signing key than it enrolled with: "
                            "that needs the enrolment token (or its client certificate) again",
                        )
                    log.warning("client %s enrolled again with a new signing key", client_id)
                if sent_features:
                    self.add_features(client_id, feature_sum, examples)
                member.public_key, member.last_seen = public_key.hex(), self.clock()
                member.epoch, member.left = member.epoch + 1, False
                return member, self.state_changed()
            if not enrolled:
                raise Rejected(
                    "UNAUTHENTICATED",
                    "joining needs the operator's enrolment token (--enrol, $FEDMOE_ENROLMENT_TOKEN, or the "
                    "enrolment.token beside --certs; without either the coordinator keeps it in "
                    "<state>/enrolment.token) or, under mutual TLS, a client certificate",
                )
            present = sum(not m.left for m in self.members.values())
            if present >= self.config.membership.max_members:
                raise Rejected(
                    "RESOURCE_EXHAUSTED",
                    f"the federation is full: {present} members (membership.max_members)",
                )
            if not by_data and not sent_features:
                raise Rejected(
                    "INVALID_ARGUMENT",
                    "a client joins with the routing statistics of its data (feature_sum and "
                    "examples: spec.feature_statistics(examples)); update the client",
                )
            client_id = f"c{len(self.members):04d}"
            try:
                if by_data:
                    engine = self.engine
                    path_model = engine.model.compose(engine.paths[0])  # every path has the same shapes
                    variant = assign_variant(profile, path_model, self.config.compression.scheme)
                else:
                    variant = self.engine.assign(client_id, profile).variant
            except ValueError as e:
                raise Rejected("RESOURCE_EXHAUSTED", str(e)) from None
            if not by_data:
                try:
                    self.add_features(client_id, feature_sum, examples)
                except Rejected:
                    del self.engine.assignments[client_id]
                    raise
            member = Member(client_id, name, profile.name, public_key.hex(), self.clock(), asdict(profile))
            self.members[client_id] = member
            if not by_data and len(self.members) == self.config.policy.min_clients:
                self.round_opened = self.clock()  # round 0 opens: its deadline runs
            self.start_clustering()
            version = self.state_changed()
            if len(self.members) == self.config.policy.min_clients:
                self.changed()  # the federation is complete: its first round opens
            placed = (
                "paths by its data"
                if by_data
                else f"path {self.engine.assignments[client_id].path}, {examples:g} examples"
            )
            log.info(
                "client %s (%s, %s) joined: %s, variant %s",
                client_id,
                member.name,
                shown(profile.name),
                placed,
                variant.name,
            )
            return member, version

    def authenticate(self, subject: str) -> str:
        """The member a valid token's subject ("<client id>/<epoch>") names, recorded as heard from now;
        UNAUTHENTICATED when that token was revoked (the member rejoined or left since)."""
        client_id, _, epoch = subject.rpartition("/")
        with self.lock:
            member = self.members.get(client_id)
            if member is None or member.left or str(member.epoch) != epoch:
                raise Rejected(
                    "UNAUTHENTICATED",
                    "this token was revoked (its client rejoined or left since): join again",
                )
            member.last_seen = self.clock()
            return client_id

    def check_proof(self, client_id: str, proof: bytes, proof_time: int) -> None:
        """Accept a rejoin proven by the member's pinned key instead of a token (see JoinRequest.proof):
        the key's signature of `rejoin_message(client_id, proof_time)`, the time within
        `PROOF_WINDOW_MS` of this clock and later than the member's last proof; UNAUTHENTICATED otherwise."""
        now_ms = int(time.time() * 1000)
        with self.lock:
            member = self.members.get(client_id)
            if member is None or member.left:
                raise Rejected("UNAUTHENTICATED", f"no member {shown(client_id)} to rejoin as: join anew")
            if abs(now_ms - proof_time) > PROOF_WINDOW_MS or proof_time <= member.proof_time:
                raise Rejected(
                    "UNAUTHENTICATED",
                    "a rejoin proof is made afresh: its time within 5 minutes of the coordinator's clock and "
                    "later than the client's last proof",
                )
            try:
                verify_signature(
                    bytes.fromhex(member.public_key), rejoin_message(client_id, proof_time), proof
                )
            except AuthError:
                raise Rejected(
                    "UNAUTHENTICATED", "the rejoin proof is not signed by the client's key"
                ) from None
            member.proof_time = proof_time

    def leave(self, client_id: str) -> None:
        """A member leaves: it stops counting in the quorum and its tokens are revoked. Its updates already
        stored still count; joining again needs the enrolment credential."""
        with self.lock:
            member = self.member(client_id)
            member.left, member.epoch = True, member.epoch + 1
            version = self.state_changed()
            log.info("client %s (%s) left", client_id, member.name)
            self.close_if_due()
        self.wait_saved(version)

    def active_workers(self) -> int:
        """Workers whose member is present and heard from within `membership.evict_after_s`: the quorum
        counts these. Counted again when the membership changed, else at most every `ACTIVE_RECOUNT_S`
        (each update folded in asks: a round of N updates would count N members N times)."""
        now, limit = self.clock(), self.config.membership.evict_after_s
        counted = self.active_count
        if counted is not None and counted[0] == self.version and now - counted[1] < ACTIVE_RECOUNT_S:
            return counted[2]
        active = {
            c
            for c, m in self.members.items()
            if not m.left and (now - m.last_seen <= limit or c in self.waiting)
        }
        count = sum(w.partition(".")[0] in active for w in self.engine.assignments)
        self.active_count = (self.version, now, count)
        return count

    def add_features(self, client_id: str, feature_sum: np.ndarray, examples: float) -> None:
        """Record a client's routing statistics, or refuse them (INVALID_ARGUMENT)."""
        try:
            self.engine.add_features(client_id, feature_sum, examples)
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", f"bad routing statistics: {e}") from None

    def member(self, client_id: str) -> Member:
        """The member with this id, or NOT_FOUND."""
        if client_id not in self.members:
            raise Rejected("NOT_FOUND", f"unknown client {shown(client_id)}: join without a client id")
        return self.members[client_id]

    def assignment(self, client_id: str) -> Assignment | None:
        """The member's path, variant and seed when paths go in turn; None when routing by data."""
        with self.lock:
            self.member(client_id)
            return self.engine.assignments.get(client_id) if self.engine.kmeans is None else None

    def workers(self, client_id: str) -> dict[str, Assignment]:
        """The member's workers, in enrolment order: {worker id: assignment}; its id alone in turn mode,
        "<client id>.<cluster>" when routing by data."""
        assignments = self.engine.assignments
        if self.engine.kmeans is None:
            ids = [client_id]
        else:
            ids = [f"{client_id}.{k}" for k in range(self.config.n_paths)]
        return {w: assignments[w] for w in ids if w in assignments}

    def action(self, client_id: str) -> tuple[str, list[str]]:
        """What a client should do now, and for TRAIN the workers to train: "TRAIN", "WAIT", "DONE",
        "CLUSTER" (answer the open proposal) or "ASSIGN" (send a histogram). Closes what is due."""
        with self.lock:
            member = self.member(client_id)
            member.last_seen = self.clock()
            self.advance()
            return self.told(client_id)

    def told(self, client_id: str) -> tuple[str, list[str]]:
        """What a member is told to do now, closing nothing (see `action`; under the lock)."""
        if self.opening:  # a round closed: the next opens once its state is on disk
            return "WAIT", []
        if self.finished:
            self.told_done.add(client_id)
            return "DONE", []
        if not self.engine.clustered:
            answer = client_id in self.clustering and client_id not in self.answers
            return ("CLUSTER" if answer else "WAIT"), []
        mine = self.workers(client_id)
        if not mine:
            return ("WAIT" if client_id in self.held else "ASSIGN"), []
        if len(self.members) < self.config.policy.min_clients:
            return "WAIT", []
        todo = [w for w in mine if w not in self.pending and w not in self.storing.values()]
        return ("TRAIN", todo) if todo else ("WAIT", [])

    def hold(self, client_id: str, wait_s: float, wake: Callable[[], None]) -> Waiter:
        """A heartbeat of `client_id` held while its action is WAIT (a long-poll): its `answer` set at once
        when the member has something to do or may not wait (`wait_s` 0, a wait of it held already, or
        `membership.max_members` waiting); otherwise it waits, and `changed` answers it and calls `wake` as
        soon as the coordinator's state gives the member something to do. The caller waits at most `wait_s`
        (and `MAX_HOLD_S`), calls `advance_due` when `due` passes, and `release`s it.

        A waiting member costs no work and takes no lock until it is answered.
        """
        with self.lock:
            answer = self.action(client_id)
            crowded = len(self.waiting) >= self.config.membership.max_members
            if answer[0] != "WAIT" or wait_s <= 0 or client_id in self.waiting or crowded:
                return Waiter(wake, answer)
            waiter = self.waiting[client_id] = Waiter(wake, due=time.monotonic() + self.until_due())
            return waiter

    def advance_due(self, waiter: Waiter) -> None:
        """A deadline of the policy passed while `waiter` waited: close what is due and set its next `due`."""
        with self.lock:
            if waiter.answer is None:
                self.advance()
                waiter.due = time.monotonic() + self.until_due()

    def release(self, client_id: str, waiter: Waiter) -> tuple[str, list[str]]:
        """A held heartbeat's answer once its wait ended (WAIT when none came); it no longer waits."""
        if waiter.answer is None:
            with self.lock:
                if self.waiting.get(client_id) is waiter:
                    del self.waiting[client_id]
        return waiter.answer or ("WAIT", [])

    def until_due(self) -> float:
        """Seconds until a deadline of the policy may change what members are told: the open round's (with an
        update pending), the clustering pass's, or the held histograms' (inf: none runs)."""
        now, deadline = self.clock(), self.config.policy.deadline_s
        opened = [self.round_opened] if self.pending else []
        opened += [self.pass_opened] if self.clustering else []
        opened += [self.barrier_opened] if self.barrier and self.held else []
        return max(0.05, min((deadline - (now - t) for t in opened), default=math.inf))

    def changed(self) -> None:
        """Answer the held heartbeats of the members that now have something to do (call under the lock)."""
        now = self.clock()
        for client_id, waiter in list(self.waiting.items()):
            answer = self.told(client_id)
            if answer[0] != "WAIT":
                del self.waiting[client_id]
                self.members[client_id].last_seen = now
                waiter.answer = answer
                waiter.wake()

    def advance(self) -> None:
        """Close a clustering pass, release the held histograms, or close a round, when due."""
        self.close_pass_if_due()
        self.release_if_due()
        self.close_if_due()

    # -- routing by data --------------------------------------------------------------------
    def start_clustering(self) -> None:
        """Start federated k-means over the members once `policy.min_clients` joined (routing by data)."""
        kmeans = self.engine.kmeans
        if kmeans is None or kmeans.done or self.clustering:
            return
        present = [c for c, m in self.members.items() if not m.left]
        if len(present) < self.config.policy.min_clients:
            return
        self.clustering = present
        self.answers, self.cluster_counts, self.passes = {}, {}, 0
        self.pass_opened = self.clock()
        log.info("federated k-means starts over %d clients: %s", len(self.clustering), self.clustering)
        self.changed()

    def proposal(self, client_id: str) -> Proposal:
        """The open clustering proposal, or the converged centroids and prices (FAILED_PRECONDITION before
        clustering starts, or when paths go in turn)."""
        with self.lock:
            self.member(client_id)
            engine = self.engine
            if engine.kmeans is None:
                raise Rejected(
                    "FAILED_PRECONDITION", "paths go in turn (routing.assign = 'turn'): no clustering"
                )
            if engine.kmeans.done:
                centroids, prices = engine.routing_state()
                return Proposal(self.passes, centroids, prices, 0.0, False, True)
            if not self.clustering:
                raise Rejected(
                    "FAILED_PRECONDITION",
                    f"clustering starts when {self.config.policy.min_clients} clients joined "
                    f"({len(self.members)} so far)",
                )
            return Proposal(self.passes, *engine.cluster_proposal(), False)

    def cluster(
        self,
        client_id: str,
        number: int,
        counts: np.ndarray,
        sums: np.ndarray,
        squares: np.ndarray,
        soft: np.ndarray,
        products: np.ndarray | None = None,
    ) -> Proposal:
        """Take a member's statistics (flat, as they travel) for pass `number`; close the pass when due.

        FAILED_PRECONDITION for another pass or a client outside the clustering, ALREADY_EXISTS for a second
        answer, INVALID_ARGUMENT for statistics of the wrong shapes, not finite, negative, counting
        fractions or another number of examples than the client's earlier answers. Returns the pass open now
        (as `proposal` would).
        """
        with self.lock:
            self.member(client_id)
            kmeans = self.engine.kmeans
            if kmeans is None or kmeans.done or client_id not in self.clustering:
                raise Rejected(
                    "FAILED_PRECONDITION", f"client {client_id} takes no part in a clustering pass"
                )
            if number != self.passes:
                raise Rejected(
                    "FAILED_PRECONDITION", f"an answer to pass {number}, but pass {self.passes} is open"
                )
            if client_id in self.answers:
                raise Rejected("ALREADY_EXISTS", f"client {client_id} already answered pass {number}")
            try:
                stats = self.cluster_statistics(client_id, counts, sums, squares, soft, products)
            except ValueError as e:
                raise Rejected("INVALID_ARGUMENT", f"bad cluster statistics: {e}") from None
            self.answers[client_id] = stats
            self.cluster_counts[client_id] = float(stats.counts.sum())
            self.close_pass_if_due()
            if self.engine.kmeans.done:
                return Proposal(self.passes, *self.engine.routing_state(), 0.0, False, True)
            return Proposal(self.passes, *self.engine.cluster_proposal(), False)

    def cluster_statistics(
        self,
        client_id: str,
        counts: np.ndarray,
        sums: np.ndarray,
        squares: np.ndarray,
        soft: np.ndarray,
        products: np.ndarray | None = None,
    ) -> ClusterStats:
        """A member's flat statistics as `ClusterStats` of the open proposal's shapes, or ValueError."""
        centroids, _, softness, asked = self.engine.cluster_proposal()
        counts, sums, squares, soft = (
            np.asarray(a, dtype=np.float64).reshape(-1) for a in (counts, sums, squares, soft)
        )
        k = 1 if centroids is None else len(centroids)
        # the first pass takes any width of routing features: at its close the most answers' width wins
        width = len(sums) // k if centroids is None else centroids.shape[1]
        if width < 1 or len(sums) != k * width or len(squares) != k * width:
            raise ValueError(
                f"sums and squares of {len(sums)} and {len(squares)} values; expected {k} x {width}"
            )
        if (len(soft) != k) if softness > 0 else len(soft):
            raise ValueError(f"{len(soft)} soft counts; expected {k if softness > 0 else 0}")
        products = np.zeros(0) if products is None else np.asarray(products, dtype=np.float64)
        if len(products) and not asked:
            raise ValueError("second moments this pass does not ask for")
        stats = ClusterStats(
            counts,
            sums.reshape(k, width),
            squares.reshape(k, width),
            soft if softness > 0 else None,
            from_upper_triangles(products, k, width) if asked else None,
        )
        stats.check(k, width)
        total = counts.sum()
        if (counts % 1).any() or total <= 0:
            raise ValueError("counts must be whole numbers of examples, at least one in all")
        # per cluster and feature, sum^2 <= count * sum of squares (Cauchy-Schwarz)
        if (stats.sums**2 > counts[:, None] * stats.squares * (1 + 1e-9) + 1e-9).any():
            raise ValueError("sums that no examples with these counts and sums of squares have")
        expected = self.cluster_counts.get(client_id)
        if expected is not None and total != expected:
            raise ValueError(f"{total:g} examples, but {expected:g} in the client's earlier answers")
        if stats.soft is not None and (
            not np.isfinite(stats.soft).all()
            or (stats.soft < 0).any()
            or abs(stats.soft.sum() - total) > 1e-6 * total
        ):
            raise ValueError("soft counts must be finite, non-negative, and add up to the examples")
        return stats

    def close_pass_if_due(self) -> None:
        """Close the clustering pass when every member answered, or at the deadline with an answer."""
        kmeans = self.engine.kmeans
        if kmeans is None or kmeans.done or not self.clustering:
            return
        answered = [c for c in self.clustering if c in self.answers]
        if not answered:
            if self.clock() - self.pass_opened >= self.config.policy.deadline_s:
                log.warning(
                    "clustering pass %d: no member answered within %g s (policy.deadline_s): clustering "
                    "starts again over the members present",
                    self.passes,
                    self.config.policy.deadline_s,
                )
                self.engine.kmeans, self.clustering = self.engine.new_kmeans(), []
                self.start_clustering()
            return
        if len(answered) < len(self.clustering):
            if self.clock() - self.pass_opened < self.config.policy.deadline_s:
                return
            silent = [c for c in self.clustering if c not in self.answers]
            log.warning(
                "clustering pass %d closes without %s: they leave the clustering", self.passes, silent
            )
            self.clustering = answered
        widths = [self.answers[c].sums.shape[1] for c in answered]
        width = max(widths, key=widths.count)  # the most answers' (ties: the earliest member's)
        odd = [c for c, w in zip(answered, widths) if w != width]
        if odd:
            log.warning(
                "clustering pass %d: %s sent routing features of another width than the %d of the others: "
                "they leave the clustering",
                self.passes,
                odd,
                width,
            )
            answered = [c for c in answered if c not in odd]
            self.clustering = [c for c in self.clustering if c not in odd]
        total = self.answers[answered[0]]
        for client_id in answered[1:]:  # summed in join order: the same sums as every runner's
            total = total + self.answers[client_id]
        done = self.engine.cluster_update(total)
        self.passes += 1
        self.answers = {}
        self.pass_opened = self.clock()
        self.changed()
        if done:
            self.clustered = {c: self.cluster_counts[c] for c in self.clustering}
            self.barrier, self.held = list(self.clustering), {}
            self.barrier_opened = self.clock()
            self.clustering = []
            self.save_state()

    def assign(self, client_id: str, histogram: np.ndarray) -> dict[str, Assignment]:
        """A member's workers from its histogram over the converged clusters (routing by data).

        Returns its workers (those it already has, whatever the histogram), or {} while its histogram is
        held: the histograms of the clustering members are assigned together, in join order, once all of
        them arrived or `policy.deadline_s` passed. INVALID_ARGUMENT for a histogram that is not k whole
        non-negative counts, or (for a clustering member) counts another number of examples than it clustered.
        """
        with self.lock:
            self.member(client_id)
            if self.engine.kmeans is None:
                raise Rejected(
                    "FAILED_PRECONDITION", "paths go in turn (routing.assign = 'turn'): given at join"
                )
            mine = self.workers(client_id)
            if mine:
                return mine
            if not self.engine.clustered:
                raise Rejected("FAILED_PRECONDITION", "clustering has not converged yet")
            try:
                counts = check_histogram(histogram, self.config.n_paths)
            except ValueError as e:
                raise Rejected("INVALID_ARGUMENT", str(e)) from None
            expected = self.clustered.get(client_id)
            if expected is not None and counts.sum() != expected:
                raise Rejected(
                    "INVALID_ARGUMENT",
                    f"a histogram of {counts.sum()} examples, but the client clustered {expected:g}",
                )
            if self.barrier:
                self.held[client_id] = counts
                self.release_if_due()
                return self.workers(client_id)
            self.assign_now(client_id, counts)
            version, workers = self.state_changed(), self.workers(client_id)
        self.wait_saved(version)
        return workers

    def assign_now(self, client_id: str, counts: np.ndarray) -> None:
        """Give a member its workers by its histogram (the engine registers them in this order)."""
        try:
            workers = self.engine.assign_by_data(client_id, self.members[client_id].device_profile, counts)
        except ValueError as e:
            raise Rejected("RESOURCE_EXHAUSTED", str(e)) from None
        shown = ", ".join(f"{w} on path {a.path} ({a.examples} examples)" for w, a in workers.items())
        log.info("client %s assigned by its data: %s", client_id, shown)

    def release_if_due(self) -> None:
        """Assign the held histograms in join order once the clustering members' are all in, or at the
        deadline with at least one."""
        if not self.barrier or not self.held:
            return
        complete = set(self.barrier) <= set(self.held)
        if not complete and self.clock() - self.barrier_opened < self.config.policy.deadline_s:
            return
        if not complete:
            log.warning("assigning without the histograms of %s", sorted(set(self.barrier) - set(self.held)))
        for client_id in [c for c in self.members if c in self.held]:
            try:
                self.assign_now(client_id, self.held[client_id])
            except Rejected as e:
                log.warning("client %s not assigned: %s", client_id, e.detail)
        self.barrier, self.held = [], {}
        self.round_opened = self.clock()  # round 0 opens: its deadline runs
        self.save_state()
        self.changed()

    # -- rounds -----------------------------------------------------------------------------
    def worker(self, client_id: str, worker_id: str) -> str:
        """The member's worker `worker_id` (empty: the member's id, in turn mode), or NOT_FOUND."""
        self.member(client_id)
        worker_id = worker_id or client_id
        if worker_id not in self.workers(client_id):
            raise Rejected("NOT_FOUND", f"client {client_id} has no worker {shown(worker_id)}")
        return worker_id

    def job(self, client_id: str, worker_id: str = "") -> Job:
        """A worker's job in the open round: its path's weights as it holds them, the inner settings."""
        with self.lock:
            worker_id = self.worker(client_id, worker_id)
            if self.opening:
                raise Rejected("UNAVAILABLE", "a round closed: the next opens once its state is saved, retry")
            if self.finished:
                raise Rejected("FAILED_PRECONDITION", "training has finished")
            return self.engine.job(worker_id)

    def expected_upload(
        self, header: Upload, client_id: str, update_id: str, worker_id: str = ""
    ) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Check an upload's header (its tensors not read yet) as `submit` will; the tensors it must carry:
        {name: (bits, shape)}. A push is refused on its header, before any of its data is read."""
        check_identifier("update_id", update_id)
        with self.lock:
            worker_id = self.worker(client_id, worker_id)
            self.admissible(header, client_id, update_id, worker_id)
            return self.engine.expected_upload(worker_id, header.round)

    def spool(self) -> Spool:
        """A file to receive an upload's tensors into as they arrive (`fedmoe.wire.TensorReader`), which
        `submit` then stores without writing them again. Spools left by a stopped coordinator are removed
        when the next one starts."""
        return Spool(self.state_dir / PENDING)

    def submit(
        self,
        upload: Upload,
        client_id: str,
        update_id: str,
        signature: bytes = b"",
        worker_id: str = "",
        spool: Spool | None = None,
    ) -> int:
        """Validate and durably store one upload of a member's worker for the open round, fold it into the
        round's aggregation, close the round when due; the open round. `spool`: the upload's tensors are
        the records written there (see `spool`), stored as they are; the caller discards it if refused.

        Every update is signed by the member's pinned key (see `signed_fields`). The signature, decoding and
        norm checks read only the upload and the grid's shapes, and the durable write only the upload, so
        they run outside the lock: other clients heartbeat, pull and push meanwhile, and writes that arrive
        together reach the disk together. An update takes an arrival number before it is written (stored with
        it); updates are folded in by arrival number, so a restarted coordinator that folds in the stored
        ones in that order reaches the same sums bit for bit. The round does not close while an update is
        being written.
        """
        check_identifier("update_id", update_id)
        with self.lock:
            worker_id = self.worker(client_id, worker_id)
            public_key = self.admissible(upload, client_id, update_id, worker_id)
        try:
            digest = update_digest(signed_fields(worker_id, update_id, upload), upload.tensors)
            verify_signature(bytes.fromhex(public_key), digest, signature)
        except AuthError as e:
            raise Rejected("UNAUTHENTICATED", str(e)) from None
        try:
            update = self.engine.decode(worker_id, upload)
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", str(e)) from None
        norm, limit = update_norm(update), self.config.aggregation.max_update_norm
        if not np.isfinite(norm) or norm > limit:
            raise Rejected(
                "INVALID_ARGUMENT",
                f"outer gradient norm {norm:.3g} is not finite or above {limit:g} "
                "(aggregation.max_update_norm)",
            )
        with self.lock:
            # the round, the pending set or the key may have changed meanwhile
            if self.admissible(upload, client_id, update_id, worker_id) != public_key:
                raise Rejected(
                    "UNAUTHENTICATED",
                    f"client {client_id} rejoined with another key while its update was checked",
                )
            staleness = self.round - upload.round
            if staleness:
                upload = replace(upload, weight=upload.weight / (1 + staleness))
                update = replace(update, weight=upload.weight)
            arrival, counted_in = self.arrivals, self.round
            self.arrivals += 1
            self.storing[arrival] = worker_id
            self.seen_updates.add(update_id)
        try:
            self.write_pending(worker_id, update_id, upload, counted_in, arrival, spool)
        except BaseException:
            with self.lock:
                del self.storing[arrival]
                self.seen_updates.discard(update_id)
                self.fold_stored()
            raise
        crash_point("push-stored")  # durable, not yet acknowledged
        with self.lock:
            self.stored[arrival] = (worker_id, update_id, upload, update)
            self.fold_stored()
            self.written.wait_for(lambda: not self.opening)  # a round it closed is open again
            return self.round

    def fold_stored(self) -> None:
        """Fold the stored updates into the round's aggregation in arrival order, up to the first one still
        being written; close the round when due."""
        while self.stored and min(self.stored) == min(self.storing):
            arrival = min(self.stored)
            worker_id, update_id, upload, update = self.stored.pop(arrival)
            del self.storing[arrival]
            self.aggregation.add(update)
            self.pending[worker_id] = (Received.of(upload), update_id)
        self.close_if_due()

    def admissible(self, upload: Upload, client_id: str, update_id: str, worker_id: str) -> str:
        """Raise `Rejected` unless this member may submit this upload of its worker now (round, replay,
        assignment, weight, evaluation).

        Returns the member's public key (hex).
        """
        member = self.member(client_id)
        if update_id in self.seen_updates:
            raise Rejected("ALREADY_EXISTS", f"update {update_id} was already accepted")
        policy = self.config.policy
        staleness = self.round - upload.round
        late_ok = policy.late == "stale" and staleness <= policy.max_staleness
        if self.finished or staleness < 0 or (staleness > 0 and not late_ok):
            raise Rejected(
                "FAILED_PRECONDITION", f"update for round {upload.round}, but round {self.round} is open"
            )
        if member.left:
            raise Rejected("FAILED_PRECONDITION", f"client {client_id} left the federation")
        if worker_id in self.pending or worker_id in self.storing.values():
            raise Rejected(
                "ALREADY_EXISTS", f"worker {worker_id} already sent its update for round {self.round}"
            )
        try:
            self.engine.check(worker_id, upload)
            assignment = self.engine.assignments[worker_id]
            check_upload(upload, assignment.examples or self.engine.feature_counts.get(worker_id, 0.0))
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", str(e)) from None
        return member.public_key

    def close_if_due(self) -> None:
        """Close the open round when the policy says so (the quorum of the workers sent, or the deadline
        passed with an update), no update is being stored and the round before is open."""
        if not self.pending or self.storing or self.opening:  # spare every heartbeat the count of workers
            return
        workers = self.active_workers()
        if self.engine.round_due(len(self.pending), workers, self.clock() - self.round_opened):
            self.close_round()

    def close_round(self) -> None:
        """Take the outer step with the round's aggregation (the metrics and the learned router over the
        updates in enrolment order, whatever order they came in) and open the next round once the state is
        on disk: a copy of it is written off the lock (`open_round`, on a thread of its own), while members
        are told to wait."""
        order = {w: i for i, w in enumerate(self.engine.assignments)}
        received = [self.pending[w][0] for w in sorted(self.pending, key=order.__getitem__)]
        metrics = self.engine.close_aggregated(self.aggregation, received)
        crash_point("round-close")  # aggregated in memory, not yet saved
        self.metrics.append(metrics)
        shown = (
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "round"
        )
        log.info("round %d closed: %s", metrics["round"], ", ".join(shown))
        self.pending.clear()
        self.aggregation, self.arrivals = self.engine.aggregation(), 0
        self.opening = self.state_changed()
        state = (self.opening, *self.state_copy())
        threading.Thread(target=self.open_round, args=state, name="fedmoe-round", daemon=True).start()

    def open_round(self, version: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Write the state of a closed round (`version`, from `state_copy`), then open the next: its deadline
        starts and the members are told. The closed round's updates stay until the next round closes (the
        previous state generation, which a torn newest one falls back to, reads them again); older ones go,
        off the lock (resume skips them)."""
        try:
            self.write_state(version, tensors, manifest)
        except Exception:  # the federation goes on; a restart resumes from the state saved before
            log.exception("the state of round %d could not be saved", manifest["engine"]["round"])
        with self.lock:
            self.opening = 0
            self.round_opened = self.clock()
            self.written.notify_all()
            if self.finished:
                crash_point("final-save")  # the last round saved, the ensemble not yet written
                self.write_ensemble()
            self.changed()
        remove_all([p for p in (self.state_dir / PENDING).glob("r*") if pending_round(p) < self.round - 1])

    def write_ensemble(self) -> None:
        """Write the final ensemble into the state directory."""
        self.engine.ensemble().save(self.state_dir / "ensemble", extra={"metrics": self.metrics})
        log.info("training finished: ensemble written to %s", self.state_dir / "ensemble")

    def status(self) -> dict[str, Any]:
        """Round, members (with assignments), metrics and the model description, for `Status` and logs.

        Copied under the lock, built outside it: a status of a thousand members does not hold up the
        calls that need the lock."""
        with self.lock:
            members = [(client_id, member.to_dict()) for client_id, member in self.members.items()]
            workers = {client_id: self.workers(client_id) for client_id, _ in members}
            status = {
                "round": self.round,
                "rounds": self.config.rounds,
                "finished": self.finished,
                "routing": self.config.routing.assign,
                "clustering": {
                    "running": bool(self.clustering),
                    "passes": self.passes,
                    "members": list(self.clustering),
                },
                "pending": sorted(self.pending),
                "metrics": list(self.metrics),
                "model": self.model,
            }
        status["members"] = []
        for client_id, member in members:
            theirs = {w: a.to_dict() for w, a in workers[client_id].items()}
            status["members"].append({**member, **theirs.get(client_id, {}), "workers": theirs})
        return status

    # -- state ------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Checkpoint the state now (see `state_manifest`), holding the lock meanwhile."""
        with self.lock:
            version = self.state_changed()
            tensors, manifest = self.engine.state_tensors(), self.state_manifest()
            with self.writing:
                save_checkpoint(self.state_dir / "state", tensors, manifest, keep_previous=True)
                self.saved_version = version
            self.written.notify_all()

    def state_changed(self) -> int:
        """Count a change of the state (under the lock); the version to wait for with `wait_saved`."""
        self.version += 1
        return self.version

    def wait_saved(self, version: int) -> None:
        """Return once state `version`, or a newer one, is on disk (call without the lock). The first caller
        writes the state as it is then, covering every change counted before, while later callers wait for
        it or write the next: changes that arrive together share one write."""
        while True:
            with self.lock:
                if self.saved_version >= version:
                    return
                if self.saving:
                    self.written.wait()
                    continue
                self.saving, newest = True, self.version
                tensors, manifest = self.state_copy()
            try:
                self.write_state(newest, tensors, manifest)
            finally:
                with self.lock:
                    self.saving = False
                    self.written.notify_all()

    def state_copy(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The state's tensors (copies: the grid may take its next outer step while they are written) and its
        manifest, to write off the lock with `write_state` (call under the lock)."""
        tensors = {name: t.clone() for name, t in self.engine.state_tensors().items()}
        return tensors, self.state_manifest()

    def write_state(self, version: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Write state `version` (from `state_copy`), unless a newer one was written meanwhile (call without
        the lock)."""
        with self.writing:
            if self.saved_version < version:
                save_checkpoint(self.state_dir / "state", tensors, manifest, keep_previous=True)
                self.saved_version = version

    def state_manifest(self) -> dict[str, Any]:
        """The state besides the grid's tensors, as JSON: the engine's (round, assignments, routing
        statistics, converged clustering), members, who the held histograms wait for, the updates seen and
        the metrics."""
        return {
            "kind": "coordinator",
            "config": self.config.model_dump(mode="json"),
            "engine": self.engine.state_manifest(),
            "members": [m.to_dict() for m in self.members.values()],
            "clustered": dict(self.clustered),
            "barrier": list(self.barrier),
            # the open round's updates are known by their pending files: one that turns out unreadable is
            # sent again with the same id
            "seen_updates": sorted(self.seen_updates - {update_id for _, update_id in self.pending.values()}),
            "metrics": list(self.metrics),
        }

    def resume(self) -> None:
        """Load the newest readable state generation (saying so when it falls back to the previous one) and
        the acknowledged uploads of the open round, if there are any. Writes the ensemble if training had
        finished without it."""
        directory = self.state_dir / "state"
        if not any((directory / name).exists() for name in ("manifest.json", "manifest.prev.json")):
            return
        try:
            tensors, manifest, newest_error = load_latest(directory)
        except CheckpointError as e:
            raise ValueError(
                f"cannot resume from {directory}: {e}. Move the state directory away to start afresh"
            ) from None
        if newest_error is not None:
            log.warning(
                "the newest state in %s is unreadable (%s): resuming from the previous generation; the "
                "clients re-send what it lacks",
                directory,
                newest_error,
            )
        saved, now = manifest["config"], self.config.model_dump(mode="json")
        differ = [key for key in RESUME_KEYS if saved[key] != now[key]]
        if differ:
            theirs = ", ".join(f"{k} {saved[k]}" for k in differ)
            raise ValueError(
                f"{self.state_dir} holds the state of another federation ({theirs}, not "
                f"{', '.join(str(now[k]) for k in differ)}): give another state directory, "
                "or the same settings"
            )
        self.engine.load_state(tensors, manifest["engine"])
        self.members = {m["client_id"]: Member(**m) for m in manifest["members"]}
        for member in self.members.values():  # times of another process: every member starts heard from
            member.last_seen = self.clock()
        self.seen_updates = set(manifest["seen_updates"])
        self.metrics = manifest["metrics"]
        self.clustered = manifest.get("clustered", {})
        self.barrier = manifest.get("barrier", [])
        stored = []
        for path in sorted((self.state_dir / PENDING).glob("r*")):
            if pending_round(path) < self.round - 1:  # of a round two closes ago: counted and saved
                remove_all([path])
                continue
            try:
                worker_id, update_id, counted_in, arrival, upload = self.read_pending(path)
            except CheckpointError as e:
                log.warning(
                    "a stored update %s is unreadable (%s): its client is asked to send it again", path, e
                )
                continue
            self.seen_updates.add(update_id)
            if counted_in == self.round:
                stored.append((arrival, worker_id, update_id, upload))
        for arrival, worker_id, update_id, upload in sorted(stored, key=lambda s: s[0]):
            self.aggregation.add(self.engine.decode(worker_id, upload))  # in the order they were folded in
            self.pending[worker_id] = (Received.of(upload), update_id)
            self.arrivals = arrival + 1
        log.info(
            "resumed at round %d with %d members and %d pending updates",
            self.round,
            len(self.members),
            len(self.pending),
        )
        if self.finished:
            try:
                load_checkpoint(self.state_dir / "ensemble")
            except CheckpointError:
                self.write_ensemble()

    def write_pending(
        self,
        worker_id: str,
        update_id: str,
        upload: Upload,
        counted_in: int,
        arrival: int,
        spool: Spool | None = None,
    ) -> None:
        """Make an accepted upload durable before it is acknowledged, with the round it counts in and its
        arrival number in that round: each tensor's payload || scales a record, checked by the digest it
        arrived with (`fedmoe.wire.tensor_digest`); the records already written in `spool` when given."""
        tensors = upload.tensors
        manifest = {
            "kind": "upload",
            "worker_id": worker_id,
            "update_id": update_id,
            "upload": upload_meta(upload),
            "payload_bytes": {name: len(q.payload) for name, q in tensors.items()},
            "counted_in": counted_in,
            "arrival": arrival,
        }
        save_records(
            self.state_dir / PENDING / f"r{counted_in}-{worker_id}{UPDATE_SUFFIX}",
            {name: (q.payload, q.scales) for name, q in tensors.items()},
            {name: tensor_digest(q) for name, q in tensors.items()},
            manifest,
            self.group,
            spool,
        )

    def read_pending(self, path: FsPath) -> tuple[str, str, int, int, Upload]:
        """Inverse of `write_pending`: worker id, update id, the round the upload counts in, its arrival
        number, the upload."""
        records, m = load_records(path)
        try:
            qtensors = {}
            for name, q in m["upload"]["qtensors"].items():
                record, cut = records[name], m["payload_bytes"][name]
                qtensors[name] = QTensor(q["bits"], tuple(q["shape"]), record[:cut], record[cut:])
            upload = stored_upload(m["upload"], qtensors)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: a stored update that does not read back: {e!r}") from None
        return m["worker_id"], m["update_id"], m["counted_in"], m.get("arrival", 0), upload


def remove_all(paths: list[FsPath]) -> None:
    """Remove these files and directories (with what they hold; those already gone too)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def pending_round(path: FsPath) -> int:
    """The round a stored update ("r<round>-<worker id>.update") counts in."""
    return int(path.name[1:].partition("-")[0])


def check_upload(upload: Upload, reported: float) -> None:
    """Raise ValueError unless the upload's weight is positive and at most the examples its worker reported
    (`reported`: at join in turn, for its cluster when routing by data), and its evaluation is a few finite
    metrics over whole examples."""
    weight = upload.weight
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"an update's weight is its number of examples, a positive number; got {weight}")
    if weight > reported:
        raise ValueError(f"an update of weight {weight:g}, but its worker reported {reported:g} examples")
    evaluation = upload.evaluation
    if len(evaluation) > MAX_EVALUATION_ITEMS or any(len(name) > MAX_NAME for name in evaluation):
        raise ValueError(f"an evaluation is at most {MAX_EVALUATION_ITEMS} metrics with short names")
    if not all(np.isfinite(v) for v in evaluation.values()):
        raise ValueError("an evaluation's metrics must be finite")
    examples = evaluation.get("examples", 0.0)
    if examples < 0 or examples % 1:
        raise ValueError(f"an evaluation is over a whole number of examples, got {examples}")
