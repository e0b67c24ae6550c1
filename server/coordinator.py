"""The coordinator: the round engine behind a network, with membership, durable state and a round policy.

`Coordinator` drives a `fedmoe.engine.Engine` and is free of gRPC; `server.service` exposes it over gRPC.
The engine assigns paths and variants, makes each round's jobs, decodes uploads, aggregates and builds
the ensemble; the coordinator adds what a network needs: members who come and go (and sign their
updates), rounds that close at a quorum or a deadline (`config.policy`), late updates, and a state
directory. Every accepted update is written there before it is acknowledged and every closed round is
checkpointed, so a restarted coordinator resumes where it stopped and applies each acknowledged update
exactly once. The coordinator never loads training data: it evaluates only on the spec's `eval_data`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch

from fedmoe.aggregate import update_norm
from fedmoe.assignment import DeviceProfile
from fedmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedmoe.compress.quant import QTensor
from fedmoe.config import Config
from fedmoe.engine import NETWORK_SCHEMES, Assignment, Engine
from fedmoe.modular import Path
from fedmoe.outer import Update
from fedmoe.security import AuthError, update_digest, verify_signature
from fedmoe.spec import Spec, load_spec
from fedmoe.worker import Job, Upload, Variant, signed_fields

log = logging.getLogger("fedmoe.server")
RESUME_KEYS = ("spec", "grid", "seed")  # what a state directory must share with the config to be resumed


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
    public_key: str = ""  # hex of the raw Ed25519 key its updates are signed with
    last_seen: float = 0.0


def model_description(engine: Engine) -> dict[str, Any]:
    """What a client needs to build the same model: the spec's import string, grid, seed, parameter shapes."""
    states = engine.model.module_states()
    shapes = {key: {name: list(t.shape) for name, t in state.items()} for key, state in states.items()}
    config = engine.config
    return {"spec": engine.spec.ref, "grid": list(config.grid), "seed": config.seed, "shapes": shapes}


def byte_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor, for checkpoints."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


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
        self.pending: dict[str, tuple[Upload, Update]] = {}  # per client: the upload as stored, and decoded
        self.seen_updates: set[str] = set()
        self.metrics: list[dict[str, Any]] = []
        self.told_done: set[str] = set()
        self.round_opened = clock()
        self.resume()

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
        return self.finished and self.told_done >= set(self.members)

    # -- membership -------------------------------------------------------------------------
    def join(
        self,
        profile: DeviceProfile,
        name: str = "",
        client_id: str = "",
        public_key: bytes = b"",
        feature_sum: np.ndarray | None = None,
        examples: float = 0.0,
    ) -> Member:
        """Admit a client with its routing statistics; give it a path and a variant that fits, or re-admit it.

        A new client must send `feature_sum` (the sum of its examples' routing features) and `examples`
        (their number). `public_key` (raw Ed25519) is the key the client signs its updates with; a rejoining
        client may bring a new one (it lost its key in a restart) and fresh routing statistics.
        """
        with self.lock:
            if client_id:
                member = self.member(client_id)
                member.last_seen = self.clock()
                if feature_sum is not None and len(feature_sum):
                    self.add_features(client_id, feature_sum, examples)
                if public_key:
                    member.public_key = public_key.hex()
                self.save_state()
                return member
            if feature_sum is None or not len(feature_sum):
                raise Rejected(
                    "INVALID_ARGUMENT",
                    "a client joins with the routing statistics of its data (feature_sum and "
                    "examples: spec.feature_statistics(examples)); update the client",
                )
            client_id = f"c{len(self.members):04d}"
            try:
                assignment = self.engine.assign(client_id, profile)
            except ValueError as e:
                raise Rejected("RESOURCE_EXHAUSTED", str(e)) from None
            try:
                self.add_features(client_id, feature_sum, examples)
            except Rejected:
                del self.engine.assignments[client_id]
                raise
            member = Member(client_id, name or profile.name, profile.name, public_key.hex(), self.clock())
            self.members[client_id] = member
            if len(self.members) == self.config.policy.min_clients:  # round 0 opens: its deadline runs
                self.round_opened = self.clock()
            self.save_state()
            log.info(
                "client %s (%s, %s) joined: path %s, variant %s, %g examples",
                client_id,
                member.name,
                profile.name,
                assignment.path,
                assignment.variant.name,
                examples,
            )
            return member

    def add_features(self, client_id: str, feature_sum: np.ndarray, examples: float) -> None:
        """Record a client's routing statistics, or refuse them (INVALID_ARGUMENT)."""
        try:
            self.engine.add_features(client_id, feature_sum, examples)
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", f"bad routing statistics: {e}") from None

    def member(self, client_id: str) -> Member:
        """The member with this id, or NOT_FOUND."""
        if client_id not in self.members:
            raise Rejected("NOT_FOUND", f"unknown client {client_id}: join without a client id")
        return self.members[client_id]

    def assignment(self, client_id: str) -> Assignment:
        """The member's path, variant and seed."""
        with self.lock:
            self.member(client_id)
            return self.engine.assignments[client_id]

    def action(self, client_id: str) -> str:
        """What a client should do now: "TRAIN", "WAIT" or "DONE". Closes a round whose deadline passed."""
        with self.lock:
            member = self.member(client_id)
            member.last_seen = self.clock()
            self.close_if_due()
            if self.finished:
                self.told_done.add(client_id)
                return "DONE"
            if len(self.members) < self.config.policy.min_clients or client_id in self.pending:
                return "WAIT"
            return "TRAIN"

    # -- rounds -----------------------------------------------------------------------------
    def job(self, client_id: str) -> Job:
        """The member's job in the open round: its path's weights as it holds them, the inner settings."""
        with self.lock:
            self.member(client_id)
            if self.finished:
                raise Rejected("FAILED_PRECONDITION", "training has finished")
            return self.engine.job(client_id)

    def submit(self, upload: Upload, client_id: str, update_id: str, signature: bytes = b"") -> int:
        """Validate and durably store one upload for the open round, close the round when due; the open round.

        A member that joined with a public key must sign its updates (see `signed_fields`). The signature,
        decoding and norm checks read only the upload and the grid's shapes, so they run outside the lock:
        other clients heartbeat, pull and push meanwhile.
        """
        with self.lock:
            public_key = self.admissible(upload, client_id, update_id)
        if public_key:
            try:
                digest = update_digest(signed_fields(client_id, update_id, upload), upload.tensors)
                verify_signature(bytes.fromhex(public_key), digest, signature)
            except AuthError as e:
                raise Rejected("UNAUTHENTICATED", str(e)) from None
        try:
            update = self.engine.decode(client_id, upload)
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
            if self.admissible(upload, client_id, update_id) != public_key:
                raise Rejected(
                    "UNAUTHENTICATED",
                    f"client {client_id} rejoined with another key while its update was checked",
                )
            staleness = self.round - upload.round
            if staleness:
                upload = replace(upload, weight=upload.weight / (1 + staleness))
                update = replace(update, weight=upload.weight)
            self.write_pending(client_id, update_id, upload)
            self.pending[client_id] = (upload, update)
            self.seen_updates.add(update_id)
            self.close_if_due()
            return self.round

    def admissible(self, upload: Upload, client_id: str, update_id: str) -> str:
        """Raise `Rejected` unless this member may submit this upload now (round, replay, assignment).

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
        if client_id in self.pending:
            raise Rejected(
                "ALREADY_EXISTS", f"client {client_id} already sent its update for round {self.round}"
            )
        try:
            self.engine.check(client_id, upload)
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", str(e)) from None
        return member.public_key

    def close_if_due(self) -> None:
        """Close the open round when the policy says so (quorum sent, or deadline passed with an update)."""
        if self.engine.round_due(len(self.pending), len(self.members), self.clock() - self.round_opened):
            self.close_round()

    def close_round(self) -> None:
        """Aggregate the pending uploads through the engine, checkpoint, and open the next round."""
        uploads = [upload for upload, _ in self.pending.values()]
        updates = [update for _, update in self.pending.values()]
        metrics = self.engine.close_round(uploads, updates)
        self.metrics.append(metrics)
        shown = (
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "round"
        )
        log.info("round %d closed: %s", metrics["round"], ", ".join(shown))
        self.pending.clear()
        self.round_opened = self.clock()
        self.save_state()
        for stale in (self.state_dir / "pending").glob("*"):
            shutil.rmtree(stale)
        if self.finished:
            self.engine.ensemble().save(self.state_dir / "ensemble", extra={"metrics": self.metrics})
            log.info("training finished: ensemble written to %s", self.state_dir / "ensemble")

    def status(self) -> dict[str, Any]:
        """Round, members (with assignments), metrics and the model description, for `Status` and logs."""
        with self.lock:
            assignments = self.engine.assignments
            return {
                "round": self.round,
                "rounds": self.config.rounds,
                "finished": self.finished,
                "pending": sorted(self.pending),
                "metrics": self.metrics,
                "model": self.model,
                "members": [{**asdict(m), **assignments[c].to_dict()} for c, m in self.members.items()],
            }

    # -- state ------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Checkpoint the engine (grid, momentum, round, assignments, routing statistics) and members."""
        manifest = {
            "kind": "coordinator",
            "config": self.config.model_dump(mode="json"),
            "engine": self.engine.state_manifest(),
            "members": [asdict(m) for m in self.members.values()],
            "seen_updates": sorted(self.seen_updates),
            "metrics": self.metrics,
        }
        save_checkpoint(self.state_dir / "state", self.engine.state_tensors(), manifest)

    def resume(self) -> None:
        """Load the last checkpoint and the acknowledged uploads of the open round, if there are any."""
        if not (self.state_dir / "state" / "manifest.json").exists():
            return
        tensors, manifest = load_checkpoint(self.state_dir / "state")
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
        self.seen_updates = set(manifest["seen_updates"])
        self.metrics = manifest["metrics"]
        for directory in sorted((self.state_dir / "pending").glob("*")):
            try:
                client_id, update_id, counted_in, upload = self.read_pending(directory)
            except CheckpointError as e:
                log.warning("ignoring a torn pending update %s: %s", directory, e)
                continue
            if counted_in == self.round:
                self.pending[client_id] = (upload, self.engine.decode(client_id, upload))
                self.seen_updates.add(update_id)
        log.info(
            "resumed at round %d with %d members and %d pending updates",
            self.round,
            len(self.members),
            len(self.pending),
        )

    def write_pending(self, client_id: str, update_id: str, upload: Upload) -> None:
        """Make an accepted upload durable before it is acknowledged."""
        tensors = {}
        meta = {}
        for name, q in upload.tensors.items():
            tensors[f"{name}/payload"] = byte_tensor(q.payload)
            tensors[f"{name}/scales"] = byte_tensor(q.scales)
            meta[name] = {"bits": q.bits, "shape": list(q.shape)}
        manifest = {
            "kind": "upload",
            "client_id": client_id,
            "update_id": update_id,
            "path": str(upload.path),
            "variant": asdict(upload.variant),
            "round": upload.round,
            "seed": upload.seed,
            "weight": upload.weight,
            "loss": upload.loss,
            "qtensors": meta,
            "counted_in": self.round,
        }
        save_checkpoint(self.state_dir / "pending" / f"r{self.round}-{client_id}", tensors, manifest)

    def read_pending(self, directory: FsPath) -> tuple[str, str, int, Upload]:
        """Inverse of `write_pending`: client id, update id, the round the upload counts in, the upload."""
        tensors, m = load_checkpoint(directory)
        qtensors = {
            name: QTensor(
                meta["bits"],
                tuple(meta["shape"]),
                tensors[f"{name}/payload"].numpy().tobytes(),
                tensors[f"{name}/scales"].numpy().tobytes(),
            )
            for name, meta in m["qtensors"].items()
        }
        upload = Upload(
            Path.parse(m["path"]),
            Variant(**m["variant"]),
            m["round"],
            m["seed"],
            m["weight"],
            qtensors,
            m["loss"],
        )
        return m["client_id"], m["update_id"], m["counted_in"], upload
