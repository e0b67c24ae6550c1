"""One config tree for every runner (pydantic): a TOML file plus dotted overrides,
the same defaults everywhere.

    [federation]                       # or top-level keys
    spec = "examples.tabular:spec"
    grid = [3]
    rounds = 10

    [inner]
    steps = 50

`Config.load("job.toml", {"inner.steps": 20})` reads a file and applies overrides (the CLI's `--set
inner.steps=20`). Settings whose best default depends on the federation are None until `resolve_outer`
picks them: the rule lives here, and every runner logs what it chose.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("fedmoe.config")
DEFAULT_SPEC = "fedmoe.models.digits:spec"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InnerConfig(_Section):
    """Local optimisation: steps per round (H), learning rate and its schedule over the rounds, batch size."""

    steps: int = Field(50, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(32, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"

    def lr_at(self, round: int, rounds: int, floor: float = 0.1) -> float:
        """The inner learning rate of round `round` (0-based) of `rounds`:
        constant, or cosine from lr to floor * lr.
        """
        if self.schedule == "constant":
            return self.lr
        progress = min(round / max(rounds - 1, 1), 1.0)
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class OuterConfig(_Section):
    """The DiLoCo outer step. lr and momentum default by `resolve_outer`:
    1.0 / 0 with one worker per module, else 0.7 / 0.9.
    """

    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool = True


class CompressionConfig(_Section):
    """How pruned clients' sub-models are cut: rolling (FedRolex), static (HeteroFL) or random width slices,
    or magnitude (in-process only: its masks depend on weights a pruned client never receives). Bit-widths
    come from each client's device profile."""

    scheme: Literal["rolling", "static", "random", "magnitude"] = "rolling"


class RoutingConfig(_Section):
    """How paths follow the clients' data.

    "data": federated k-means on the clients' routing features finds one cluster per path (`balanced` for
    equal sizes over the federation's counts; `tol`, `max_iter` per stage); each client reports how many of
    its examples fall in each cluster and trains the path of every cluster holding at least `min_share` of
    them (always its largest) on its examples of that cluster, weighted by their number: no example trains
    another cluster's path and none is left out above that share. The router routes by the federated
    centroids, at a temperature from the data, or with `router = "learned"` by a small classifier of the
    clusters trained alongside the experts by FedAvg (one worker per client trains it on all the client's
    features and cluster labels, `ROUTER_STEPS` steps a round). "turn": paths in turn by
    join order, each client on all its examples; the router's centroids: each path's clients' mean features.
    """

    assign: Literal["data", "turn"] = "data"
    router: Literal["centroid", "learned"] = "centroid"
    min_share: float = Field(0.1, gt=0, le=1)
    balanced: bool = False
    tol: float = Field(1e-4, gt=0)
    max_iter: int = Field(100, ge=1)


class ClientsConfig(_Section):
    """Virtual clients of the in-process and Flower runners: how many (None: one per path), the device
    profiles they cycle through (see `fedmoe.assignment.PROFILES`; empty: all fp32), and where and in what
    precision they train (see `fedmoe.train.Compute`; a Flower node resolves "auto" on its own machine, so
    `--gpus-per-client` places its work on the GPU Ray gives it)."""

    count: int | None = Field(None, ge=1)
    profiles: tuple[str, ...] = ()
    device: str = "auto"  # where they train: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for training (fp16: CUDA only)


class TransportConfig(_Section):
    """The gRPC deployment: where the coordinator listens, TLS material (with `mutual_tls`, clients present a
    certificate of the same CA, and that certificate enrols them), the largest update it accepts, the threads
    serving its other calls and the state's writes (streams, held heartbeats and joins are served by its
    event loop and hold none), and the bounds of Pull and Push streams: at most `max_streams` at once (the
    others wait their turn, then are answered UNAVAILABLE; as many pushes are stored at once), each ended
    when it sends or reads nothing for `stream_idle_s` or lasts longer than `stream_max_s`."""

    address: str = "127.0.0.1:7000"
    certs: str | None = None
    mutual_tls: bool = False
    max_update_bytes: int = Field(4 << 30, ge=1)
    threads: int = Field(32, ge=2)
    max_streams: int = Field(16, ge=1)
    stream_idle_s: float = Field(30.0, gt=0)
    stream_max_s: float = Field(1800.0, gt=0)


class MembershipConfig(_Section):
    """Who may take part (networked runs): at most `max_members` members; a member silent (no call) for more
    than `evict_after_s` stops counting in the round quorum until it is heard from again."""

    max_members: int = Field(1024, ge=1)
    evict_after_s: float = Field(600.0, gt=0)


class AggregationConfig(_Section):
    """How updates combine per coordinate: mean (weighted), median or trimmed mean; optional norm clipping."""

    rule: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5)
    clip_norm: float | None = Field(None, gt=0)
    max_update_norm: float = Field(1e4, gt=0)


class RoundPolicy(_Section):
    """When a round closes (networked runs): `quorum` of the members sent,
    or `deadline_s` passed with at least one update.

    The first round opens when `min_clients` have joined. Updates for a closed round are dropped, or with
    `late="stale"` and at most `max_staleness` rounds late counted with weight 1 / (1 + staleness).
    """

    min_clients: int = Field(1, ge=1)
    quorum: float = Field(1.0, gt=0, le=1)
    deadline_s: float = Field(300.0, gt=0)
    late: Literal["drop", "stale"] = "drop"
    max_staleness: int = Field(1, ge=0)


class Config(_Section):
    """A federation: the spec, grid and rounds, and every section above; the same defaults in every runner."""

    spec: str = DEFAULT_SPEC
    grid: tuple[int, ...] = (4,)
    rounds: int = Field(10, ge=1)
    seed: int = 0
    inner: InnerConfig = InnerConfig()
    outer: OuterConfig = OuterConfig()
    compression: CompressionConfig = CompressionConfig()
    aggregation: AggregationConfig = AggregationConfig()
    policy: RoundPolicy = RoundPolicy()
    routing: RoutingConfig = RoutingConfig()
    clients: ClientsConfig = ClientsConfig()
    transport: TransportConfig = TransportConfig()
    membership: MembershipConfig = MembershipConfig()

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_grid(value)
        if isinstance(value, int):
            return (value,)
        return value

    @model_validator(mode="after")
    def _learned_router_needs_clusters(self) -> Config:
        if self.routing.router == "learned" and self.routing.assign != "data":
            raise ValueError("routing.router = 'learned' learns the clusters of routing.assign = 'data'")
        return self

    @model_validator(mode="after")
    def _positive_grid(self) -> Config:
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"every level of the grid needs at least one module, got {self.grid}")
        return self

    @property
    def n_paths(self) -> int:
        """Number of paths through the grid: the experts of the ensemble."""
        return math.prod(self.grid)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
        """A config from a TOML file (a `[federation]` table or top-level keys) and dotted overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
            data = {**raw.pop("federation", {}), **raw}
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return cls.model_validate(data)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted overrides applied ({"inner.steps": 20, "grid": "2x2"}), validated."""
        data = self.model_dump()
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return Config.model_validate(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b" (dashes read as underscores)."""
    *parents, last = key.replace("-", "_").split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} is not a section")  # noqa: TRY004 - callers catch ValueError
    data[last] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """CLI `--set key=value` items as a dict; values are read as TOML (numbers, booleans, strings, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes key=value (e.g. inner.steps=20), got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip()] = value
    return out


def parse_grid(text: str) -> tuple[int, ...]:
    """ "4" -> (4,) independent experts; "2x2" -> (2, 2) a two-level DiPaCo grid."""
    try:
        grid = tuple(int(n) for n in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"grid must look like 4 or 2x2, got {text!r}") from None
    if not grid or min(grid) < 1:
        raise ValueError(f"every level needs at least one module, got {text!r}")
    return grid


def resolve_outer(outer: OuterConfig, workers_per_module: int) -> tuple[float, float]:
    """The outer (lr, momentum): as configured, else by the number of workers averaged per module.

    With one worker per module nothing is averaged and DiLoCo's Nesterov step (0.7, 0.9) overshoots the
    worker's own end point, so the step lands exactly on it: (1.0, 0.0). With several, DiLoCo's (0.7, 0.9).
    """
    several = workers_per_module > 1
    lr = outer.lr if outer.lr is not None else (0.7 if several else 1.0)
    momentum = outer.momentum if outer.momentum is not None else (0.9 if several else 0.0)
    chosen = [name for name, value in (("lr", outer.lr), ("momentum", outer.momentum)) if value is None]
    if chosen:
        log.info(
            "outer step: lr %g, momentum %g (%s chosen for %s worker(s) per module; set outer.lr / "
            "outer.momentum to override)",
            lr,
            momentum,
            " and ".join(chosen),
            workers_per_module,
        )
    return lr, momentum
