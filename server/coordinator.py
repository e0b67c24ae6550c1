"""The coordinator: membership, assignment of paths and variants, rounds with a quorum and a deadline.

`Coordinator` is the state machine, free of gRPC; `server.service` exposes it over gRPC. Every
accepted update is written to the state directory before it is acknowledged, and every closed round
is checkpointed, so a restarted coordinator resumes where it stopped and applies each acknowledged
update exactly once.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch

from fedmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedmoe.compress.prune import WIDTH_SCHEMES
from fedmoe.compress.quant import QTensor
from fedmoe.ensemble import Ensemble
from fedmoe.experiment import CLUSTERINGS, evaluate_ensemble, make_shards
from fedmoe.modular import Path, flatten_states, unflatten_states
from fedmoe.outer import OuterOptimizer, Update
from fedmoe.router import CentroidRouter
from fedmoe.security import AuthError, update_digest, verify_signature
from fedmoe.aggregate import combine, update_norm
from fedmoe.assignment import DeviceProfile, assign_variant
from fedmoe.tasks import Task, load_task
from fedmoe.train import InnerConfig
from fedmoe.worker import Upload, Variant, decode, deliver, round_masks, signed_fields

log = logging.getLogger("fedmoe.server")


class Rejected(Exception):
    """A request the coordinator refuses; `code` names the gRPC status (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class CoordinatorConfig:
    """A federation: the task and grid, rounds, inner settings sent to clients, outer step, round policy.

    A round closes when `quorum` of the members sent their update, or `deadline_s` after it opened
    (the first round opens when `min_clients` have joined) with at least one. An update for an
    already closed round is dropped (`late="drop"`), or, with `late="stale"` and at most
    `max_staleness` rounds late, counted in the open round with its weight divided by 1 + staleness. `aggregation` ("mean", "median", "trimmed-mean"), `trim` and
    `clip_norm` choose the rule of `fedmoe.aggregate`.
    """

    task: str = "digits"
    grid: tuple[int, ...] = (4,)
    rounds: int = 10
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    partition: str = "clustered"
    clustering: str = "kmeans"
    scheme: str = "rolling"
    min_clients: int = 1
    quorum: float = 1.0
    deadline_s: float = 300.0
    max_update_norm: float = 1e4
    late: str = "drop"
    max_staleness: int = 1
    aggregation: str = "mean"
    trim: float = 0.2
    clip_norm: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"unknown clustering {self.clustering!r}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum is a fraction of the members in (0, 1], got {self.quorum}")
        if self.late not in ("drop", "stale"):
            raise ValueError(f"late updates are dropped or used with staleness weighting: 'drop' or 'stale', got {self.late!r}")
        if self.scheme not in WIDTH_SCHEMES:
            raise ValueError(f"sub-models over the network are width slices (rolling, static or random), got {self.scheme!r}: "
                             "magnitude masks depend on weights a pruned client never receives")


@dataclass
class Member:
    """A client as the coordinator knows it."""

    client_id: str
    name: str
    profile: str
    path: str
    shard: int
    variant: dict[str, Any]
    seed: int
    public_key: str = ""  # hex of the raw Ed25519 key its updates are signed with
    last_seen: float = 0.0


class Coordinator:
    """Rounds of DiLoCo over the grid, fed by clients' uploads; persisted in `state_dir`."""

    def __init__(self, config: CoordinatorConfig, state_dir: str | FsPath, task: Task | None = None, clock=time.monotonic):
        self.config, self.clock = config, clock
        self.state_dir = FsPath(state_dir)
        self.task = task or load_task(config.task)
        self.spec = self.task.model_spec(config.grid)
        self.model = self.spec.build(config.seed)
        self.paths = self.model.paths()
        self.shards, self.centroids = make_shards(self.task, config.partition, len(self.paths), config.seed, config.clustering)
        self.outer = OuterOptimizer(self.model, config.outer_lr, config.outer_momentum)
        self.lock = threading.RLock()
        self.round = 0
        self.members: dict[str, Member] = {}
        self.pending: dict[str, tuple[Upload, Update]] = {}  # per client: the upload as stored, and decoded
        self.seen_updates: set[str] = set()
        self.metrics: list[dict[str, Any]] = []
        self.told_done: set[str] = set()
        self.round_opened = clock()
        self.resume()

    # -- membership -------------------------------------------------------------------------
    def join(self, profile: DeviceProfile, name: str, client_id: str = "", public_key: bytes = b"") -> Member:
        """Admit a client (or re-admit a known one) and give it a path, a shard and a variant that fits it.

        `public_key` (raw Ed25519) is the key the client signs its updates with; a rejoining client
        may bring a new one (it lost its key in a restart).
        """
        with self.lock:
            if client_id:
                if client_id not in self.members:
                    raise Rejected("NOT_FOUND", f"unknown client {client_id}: join without a client id")
                member = self.members[client_id]
                member.last_seen = self.clock()
                if public_key and public_key.hex() != member.public_key:
                    member.public_key = public_key.hex()
                    self.save_state()
                return member
            load = {str(p): 0 for p in self.paths}
            for m in self.members.values():
                load[m.path] += 1
            index = min(range(len(self.paths)), key=lambda i: (load[str(self.paths[i])], i))
            path = self.paths[index]
            try:
                variant = assign_variant(profile, self.model.compose(path), self.config.scheme)
            except ValueError as e:
                raise Rejected("RESOURCE_EXHAUSTED", str(e)) from None
            seed = len(self.members) + 1
            member = Member(f"c{seed:04d}", name or profile.name, profile.name, str(path), index, asdict(variant), seed,
                            public_key.hex(), self.clock())
            self.members[member.client_id] = member
            if len(self.members) == self.config.min_clients:  # the first round opens now: its deadline starts
                self.round_opened = self.clock()
            self.save_state()
            log.info("client %s (%s, %s) joined: path %s, variant %s", member.client_id, member.name, profile.name, path, variant.name)
            return member

    def member(self, client_id: str) -> Member:
        """The member with this id, or NOT_FOUND."""
        if client_id not in self.members:
            raise Rejected("NOT_FOUND", f"unknown client {client_id}")
        return self.members[client_id]

    @property
    def finished(self) -> bool:
        """All rounds are done."""
        return self.round >= self.config.rounds

    @property
    def dismissed(self) -> bool:
        """Finished, and every member has been told so."""
        return self.finished and self.told_done >= set(self.members)

    def action(self, client_id: str) -> str:
        """What a client should do now: "TRAIN", "WAIT" or "DONE". Also closes a round whose deadline passed."""
        with self.lock:
            member = self.member(client_id)
            member.last_seen = self.clock()
            self.close_if_due()
            if self.finished:
                self.told_done.add(client_id)
                return "DONE"
            if len(self.members) < self.config.min_clients or client_id in self.pending:
                return "WAIT"
            return "TRAIN"

    # -- rounds -----------------------------------------------------------------------------
    def assignment(self, client_id: str) -> tuple[Member, int, dict[str, QTensor]]:
        """The member, the open round and its path's weights as this client holds them."""
        with self.lock:
            member = self.member(client_id)
            if self.finished:
                raise Rejected("FAILED_PRECONDITION", "training has finished")
            path_model = self.model.compose(Path.parse(member.path))
            variant = Variant(**member.variant)
            return member, self.round, deliver(path_model, variant, round_masks(path_model, variant, self.round, member.seed))

    def submit(self, upload: Upload, client_id: str, update_id: str, signature: bytes = b"") -> int:
        """Validate and durably store one upload for the open round; close the round at quorum. Returns the open round.

        A member that joined with a public key must sign its updates (see `signed_fields`). The signature,
        decoding and norm checks read only the upload and the grid's shapes, so they run outside the lock:
        other clients heartbeat, pull and push meanwhile.
        """
        with self.lock:
            public_key = self.admissible(upload, client_id, update_id)
        if public_key:
            try:
                verify_signature(bytes.fromhex(public_key), update_digest(signed_fields(client_id, update_id, upload), upload.tensors), signature)
            except AuthError as e:
                raise Rejected("UNAUTHENTICATED", str(e)) from None
        try:
            update = decode(self.model, upload)
        except ValueError as e:
            raise Rejected("INVALID_ARGUMENT", str(e)) from None
        norm = update_norm(update)
        if not np.isfinite(norm) or norm > self.config.max_update_norm:
            raise Rejected("INVALID_ARGUMENT", f"outer gradient norm {norm:.3g} is not finite or above {self.config.max_update_norm:g}")
        with self.lock:
            if self.admissible(upload, client_id, update_id) != public_key:  # the round, the pending set or the key may have changed meanwhile
                raise Rejected("UNAUTHENTICATED", f"client {client_id} rejoined with another key while its update was checked")
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
        """Raise `Rejected` unless this member may submit this upload now (round, replay, assignment); its public key (hex)."""
        member = self.member(client_id)
        if update_id in self.seen_updates:
            raise Rejected("ALREADY_EXISTS", f"update {update_id} was already accepted")
        staleness = self.round - upload.round
        late_ok = self.config.late == "stale" and staleness <= self.config.max_staleness
        if self.finished or staleness < 0 or (staleness > 0 and not late_ok):
            raise Rejected("FAILED_PRECONDITION", f"update for round {upload.round}, but round {self.round} is open")
        if client_id in self.pending:
            raise Rejected("ALREADY_EXISTS", f"client {client_id} already sent its update for round {self.round}")
        expected = (Path.parse(member.path), Variant(**member.variant), member.seed)
        if (upload.path, upload.variant, upload.seed) != expected:
            raise Rejected("INVALID_ARGUMENT", f"update is for path {upload.path} {upload.variant}, the assignment is {expected[0]} {expected[1]}")
        return member.public_key

    def close_if_due(self) -> None:
        """Close the open round when the quorum has sent, or when its deadline passed with at least one update."""
        if self.finished or not self.pending:
            return
        quorum = max(1, int(np.ceil(self.config.quorum * len(self.members))))
        if len(self.pending) >= quorum or self.clock() - self.round_opened >= self.config.deadline_s:
            self.close_round()

    def close_round(self) -> None:
        """Aggregate the pending uploads, take the outer step, checkpoint, and open the next round."""
        uploads = [upload for upload, _ in self.pending.values()]
        updates = [update for _, update in self.pending.values()]
        self.outer.step(*combine(updates, self.config.aggregation, self.config.trim, self.config.clip_norm))
        ensemble = self.ensemble()
        metric = evaluate_ensemble(ensemble, self.task, 1)
        self.metrics.append({"round": self.round + 1, "updates": len(uploads), self.task.metric: metric,
                             "upload_bytes": sum(u.nbytes for u in uploads)})
        log.info("round %d closed with %d updates: ensemble top-1 %s %.4f", self.round + 1, len(uploads), self.task.metric, metric)
        self.round += 1
        self.pending.clear()
        self.round_opened = self.clock()
        self.save_state()
        for stale in (self.state_dir / "pending").glob("*"):
            shutil.rmtree(stale)
        if self.finished:
            ensemble.save(self.state_dir / "ensemble", extra={"task": self.config.task, "metrics": self.metrics})
            log.info("training finished: ensemble written to %s", self.state_dir / "ensemble")

    def ensemble(self) -> Ensemble:
        """The grid's paths with a centroid router over the shards."""
        return Ensemble(self.spec, self.model, self.paths, CentroidRouter(self.centroids))

    def status(self) -> dict[str, Any]:
        """Round, members and metrics, for `fedmoe status` and logs."""
        with self.lock:
            return {
                "round": self.round, "rounds": self.config.rounds, "finished": self.finished,
                "pending": sorted(self.pending), "members": [asdict(m) for m in self.members.values()],
                "metrics": self.metrics,
            }

    # -- state ------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Checkpoint the grid, outer momentum, round and members (atomically)."""
        tensors = {f"model/{k}": v for k, v in flatten_states(self.model.module_states()).items()}
        for name, p in self._named_params():
            buffer = self.outer.sgd.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum/{name}"] = buffer
        manifest = {
            "kind": "coordinator", "round": self.round, "config": json.loads(json.dumps(asdict(self.config))),
            "members": [asdict(m) for m in self.members.values()], "seen_updates": sorted(self.seen_updates),
            "metrics": self.metrics,
        }
        save_checkpoint(self.state_dir / "state", tensors, manifest)

    def _named_params(self):
        """(module key/parameter name, parameter) over the grid, the names momentum buffers are saved under."""
        for key in self.model.module_keys():
            for name, p in self.model.module(key).named_parameters():
                yield f"{key}/{name}", p

    def resume(self) -> None:
        """Load the last checkpoint and the acknowledged uploads of the open round, if the state directory has them."""
        if not (self.state_dir / "state" / "manifest.json").exists():
            return
        tensors, manifest = load_checkpoint(self.state_dir / "state")
        self.model.load_module_states(unflatten_states({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}))
        for name, p in self._named_params():
            if f"momentum/{name}" in tensors:
                self.outer.sgd.state[p]["momentum_buffer"] = tensors[f"momentum/{name}"].clone()
        self.round = manifest["round"]
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
                self.pending[client_id] = (upload, decode(self.model, upload))
                self.seen_updates.add(update_id)
        log.info("resumed at round %d with %d members and %d pending updates", self.round, len(self.members), len(self.pending))

    def write_pending(self, client_id: str, update_id: str, upload: Upload) -> None:
        """Make an accepted upload durable before it is acknowledged."""
        tensors = {}
        meta = {}
        for name, q in upload.tensors.items():
            tensors[f"{name}/payload"] = torch.frombuffer(bytearray(q.payload), dtype=torch.uint8) if q.payload else torch.zeros(0, dtype=torch.uint8)
            tensors[f"{name}/scales"] = torch.frombuffer(bytearray(q.scales), dtype=torch.uint8) if q.scales else torch.zeros(0, dtype=torch.uint8)
            meta[name] = {"bits": q.bits, "shape": list(q.shape)}
        manifest = {
            "kind": "upload", "client_id": client_id, "update_id": update_id, "path": str(upload.path),
            "variant": asdict(upload.variant), "round": upload.round, "seed": upload.seed, "weight": upload.weight,
            "loss": upload.loss, "qtensors": meta, "counted_in": self.round,
        }
        save_checkpoint(self.state_dir / "pending" / f"r{self.round}-{client_id}", tensors, manifest)

    def read_pending(self, directory: FsPath) -> tuple[str, str, int, Upload]:
        """Inverse of `write_pending`: client id, update id, the round the upload counts in, the upload."""
        tensors, m = load_checkpoint(directory)
        qtensors = {
            name: QTensor(meta["bits"], tuple(meta["shape"]), tensors[f"{name}/payload"].numpy().tobytes(), tensors[f"{name}/scales"].numpy().tobytes())
            for name, meta in m["qtensors"].items()
        }
        upload = Upload(Path.parse(m["path"]), Variant(**m["variant"]), m["round"], m["seed"], m["weight"], qtensors, m["loss"])
        return m["client_id"], m["update_id"], m["counted_in"], upload
