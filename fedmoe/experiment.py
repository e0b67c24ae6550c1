"""The demo experiment: a dense baseline against routed ensembles of experts, at equal total training steps.

Only the demo (`fedmoe demo`) and bench/ import this module. Unlike a federation, an experiment may pool
every client's data: it needs the union for the dense baseline and for random shards. Clustered shards are
the spec's own clients (`spec.data(k, n_paths)`); random shards split the same union at random. Every
contender trains through the in-process runner, so the round engine is the one every runner uses.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedmoe.assignment import parse_profiles
from fedmoe.clustering import nearest
from fedmoe.config import Config, OuterConfig
from fedmoe.data import iid
from fedmoe.engine import Engine
from fedmoe.ensemble import Ensemble
from fedmoe.federation import LocalClient, run_federation
from fedmoe.flow import sample, sample_model
from fedmoe.modular import Path, module_key
from fedmoe.outer import ModuleStates
from fedmoe.router import LearnedRouter
from fedmoe.spec import Examples, Spec, load_spec
from fedmoe.worker import round_masks, variant_bytes

PARTITIONS = ("clustered", "random")
ROUTERS = ("learned", "centroid")
# The demo's learned router of a flow spec trains on this many prepared (noised) examples, in this many steps
# (a router of clean examples takes LearnedRouter.fit's 500): about a tenth of the experts' training FLOPs
# in the bench's flow setting.
ROUTER_DRAWS = 20_000
ROUTER_DRAWN_STEPS = 5_000


DEMO_OUTER = OuterConfig(lr=1.0, momentum=0.0)


@dataclass(frozen=True)
class Experiment:
    """A demo run: the federation's config, how many of its rounds are shared, and the router kind.

    The demo's outer step is plain averaging (`DEMO_OUTER`, lr 1.0 without momentum) unless the config sets
    one: its runs are too short (7 branched rounds by default) for DiLoCo's Nesterov momentum to pay off; on
    digits with two or more clients per path, lr 0.7 / momentum 0.9 gave 94.9% top-1 against 97.1%.

    The first `shared_rounds` of `config.rounds` train one model on all the data (as many steps per round as
    all clients together, so every round costs the same); every path then branches from it, as in
    Branch-Train-Merge and DiPaCo, and trains on its own shard for the remaining rounds. With
    `config.clients.profiles`, each path's shard is split among one client per profile.
    """

    config: Config = field(default_factory=Config)
    shared_rounds: int = 3
    router: str = "learned"
    samples: int = 1000  # generative specs: samples per contender, and how they are drawn
    sample_steps: int = 20
    solver: str = "euler"

    def __post_init__(self) -> None:
        if not 0 <= self.shared_rounds < self.config.rounds:
            raise ValueError(
                f"shared rounds must be in 0..rounds-1, got {self.shared_rounds} of {self.config.rounds}"
            )
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; known: {', '.join(ROUTERS)}")
        outer = self.config.outer
        chosen = {
            "lr": DEMO_OUTER.lr if outer.lr is None else outer.lr,
            "momentum": DEMO_OUTER.momentum if outer.momentum is None else outer.momentum,
        }
        object.__setattr__(
            self, "config", self.config.model_copy(update={"outer": outer.model_copy(update=chosen)})
        )

    @property
    def profiles(self) -> tuple[str, ...]:
        """The device profiles of each path's clients (one fp32 client when none are named)."""
        return parse_profiles(",".join(self.config.clients.profiles)) or ("fp32",)

    @property
    def steps_per_round(self) -> int:
        """Inner steps of all clients in one round: what the dense baseline gets per round."""
        return self.config.inner.steps * self.config.n_paths * len(self.profiles)

    @property
    def top_ks(self) -> list[int]:
        """The mixtures evaluated: top-1, top-2 and the full ensemble."""
        n = self.config.n_paths
        return sorted({1, min(2, n), n})


@dataclass
class RunResult:
    """Metric per round and at the end, for a dense model or for experts and their ensembles."""

    name: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    experts: list[float] = field(default_factory=list)
    router_accuracy: float | None = None
    ensemble: Ensemble | None = None
    shared_state: ModuleStates | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # generative specs: per contender
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # and their sample metrics
    # generative specs: the trained paths under each kind of router (ROUTERS), for bench/quality.py's sweep
    ensembles: dict[str, Ensemble] = field(default_factory=dict)


def generative(spec: Spec) -> bool:
    """Whether the demo scores the spec by its samples (it has a prior and sample metrics)."""
    return spec.prior is not None and spec.sample_metrics is not None


def score_samples(result: RunResult, name: str, samples: torch.Tensor, spec: Spec, test: Examples) -> float:
    """Keep a contender's samples and their metrics in `result`; return their Fréchet distance."""
    result.samples[name] = samples
    result.quality[name] = spec.sample_metrics(samples, test)
    return result.quality[name]["fd"]


def branch(states: ModuleStates, grid: Sequence[int]) -> ModuleStates:
    """Module states that start every module of each level of `grid` from a one-module-per-level model's
    module of that level.
    """
    return {
        module_key(level, m): states[module_key(level, 0)] for level, n in enumerate(grid) for m in range(n)
    }


def pooled(parts: Sequence[Examples]) -> Examples:
    """The union of several clients' examples."""
    return Examples(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]))


def make_shards(spec: Spec, partition: str, k: int, seed: int = 0) -> list[Examples]:
    """k shards of the spec's training data: its own k clients (clustered), or their union split at random."""
    if spec.data is None:
        raise ValueError(f"spec {spec.name!r} has no data loader: the demo needs one")
    clustered = [spec.data(i, k).train for i in range(k)]
    if partition == "clustered":
        return clustered
    if partition == "random":
        union = pooled(clustered)
        return [union.subset(part) for part in iid(len(union), k, seed=seed)]
    raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")


def eval_examples(spec: Spec) -> Examples:
    """The held-out examples the demo scores every contender on."""
    if spec.eval_data is None:
        raise ValueError(f"spec {spec.name!r} has no eval_data: the demo needs a held-out set")
    return spec.eval_data()


def train_dense(
    spec: Spec, experiment: Experiment, steps_per_round: int, progress: bool = True, rounds: int | None = None
) -> RunResult:
    """One model on all the data, `steps_per_round` inner steps per round, the same schedule and outer step.

    The model is cut into as many levels as the grid, one module each (the same function as an uncut model),
    and its state after `experiment.shared_rounds` rounds is kept, so that the grid can branch from it.
    """
    config = experiment.config
    levels = len(config.grid)
    dense_config = config.model_copy(
        update={
            "grid": (1,) * levels,
            "rounds": rounds or config.rounds,
            "inner": config.inner.model_copy(update={"steps": steps_per_round}),
        }
    )
    test = eval_examples(spec)
    union = pooled(make_shards(spec, "clustered", config.n_paths, config.seed))
    result = RunResult("dense")
    engine = Engine(spec, dense_config)
    dense = engine.model.compose(Path((0,) * levels))

    def on_round(engine: Engine, metrics: dict[str, Any], uploads: list) -> None:
        result.rounds.append({"round": metrics["round"], "dense": spec.evaluate(dense, test)[spec.metric]})
        if metrics["round"] == experiment.shared_rounds:
            result.shared_state = engine.model.module_states()

    run_federation(spec, dense_config, [LocalClient(union)], on_round, "dense" if progress else None, engine)
    result.final = {"dense": result.rounds[-1]["dense"]}
    if generative(spec):
        drawn = sample_model(
            dense, spec.prior, experiment.samples, experiment.sample_steps, experiment.solver, config.seed
        )
        result.final["dense"] = score_samples(result, "dense", drawn, spec, test)
    return result


def expert_clients(shards: list[Examples], profiles: Sequence[str], seed: int) -> list[LocalClient]:
    """One client per profile on each shard, each holding an equal random part of it,
    in enrolment order (profile-major).
    """
    parts = [[shard.subset(p) for p in iid(len(shard), len(profiles), seed=seed)] for shard in shards]
    return [
        LocalClient(parts[k][j], profile) for j, profile in enumerate(profiles) for k in range(len(shards))
    ]


def make_ensemble(
    kind: str, spec: Spec, engine: Engine, shards: list[Examples], seed: int
) -> tuple[Ensemble, float]:
    """The routed ensemble, and its router's accuracy at naming the path of a training example.

    A training example's path is its federated cluster's (clustered shards: paths follow the data) or its
    shard's (random shards: paths in turn). "centroid": the engine's router, as a federation has it (the
    federated centroids, or the spec's `cluster_router` of the federated clusters' statistics); "learned":
    a small MLP fitted on the examples' features with their path labels (the experiment holds the union of
    the clients' data); for a spec that prepares its examples (a flow model), on `ROUTER_DRAWS` prepared
    (noised) examples labelled with their clean example's path.
    """
    features = np.concatenate([spec.features(shard) for shard in shards])
    if engine.kmeans is not None:
        labels = nearest(features, *engine.routing_state())
    else:
        labels = np.concatenate([np.full(len(shard), k) for k, shard in enumerate(shards)])
    if spec.prepare is not None and kind == "learned":
        index = torch.randint(len(labels), (ROUTER_DRAWS,), generator=torch.Generator().manual_seed(seed))
        features = spec.features(spec.prepared(pooled(shards).subset(index), seed))
        labels = labels[index.numpy()]
    if kind == "centroid":
        ensemble = engine.ensemble()
        index = np.array([engine.paths.index(path) for path in ensemble.paths])
        routed = index[ensemble.router.probs(torch.as_tensor(features)).argmax(-1).numpy()]
        return ensemble, float((routed == labels).mean())
    torch.manual_seed(seed)
    router = LearnedRouter(features.shape[1], len(engine.paths))
    steps = ROUTER_DRAWN_STEPS if spec.prepare is not None else 500
    accuracy = router.fit(features, labels, steps=steps, seed=seed)
    return Ensemble(spec, engine.model, engine.paths, router, engine.config.grid), accuracy


def train_experts(
    spec: Spec, experiment: Experiment, partition: str, progress: bool = True, dense: RunResult | None = None
) -> RunResult:
    """Shard the data, train the paths with DiLoCo, route and ensemble them.

    Clustered shards: the clients' paths follow their data (federated k-means, `routing.assign = "data"`);
    random shards: paths in turn. The paths branch from `dense` (a `train_dense` run at `steps_per_round`,
    whose first `shared_rounds` rounds are exactly the shared phase) or, when it is None, from a shared
    phase trained here.
    """
    routing = experiment.config.routing.model_copy(
        update={"assign": "data" if partition == "clustered" else "turn"}
    )
    config = experiment.config.model_copy(update={"routing": routing})
    test = eval_examples(spec)
    shards = make_shards(spec, partition, config.n_paths, config.seed)
    engine = Engine(spec, config)
    experts = [engine.model.compose(path) for path in engine.paths]
    result = RunResult(partition)
    if experiment.shared_rounds:
        if dense is None:
            dense = train_dense(
                spec, experiment, experiment.steps_per_round, progress, rounds=experiment.shared_rounds
            )
        if dense.shared_state is None:
            raise ValueError("paths branch from a dense run that kept its shared state")
        engine.model.load_module_states(branch(dense.shared_state, config.grid))
        engine.round = experiment.shared_rounds  # the schedule spans the whole run
        result.rounds = [
            {"round": r["round"], "experts": [r["dense"]] * len(experts), "top1": r["dense"]}
            for r in dense.rounds[: experiment.shared_rounds]
        ]
    clients = expert_clients(shards, experiment.profiles, config.seed)

    def on_round(engine: Engine, metrics: dict[str, Any], uploads: list) -> None:
        if result.ensemble is None:
            result.ensemble, result.router_accuracy = make_ensemble(
                experiment.router, spec, engine, shards, config.seed
            )
        result.rounds.append(
            {
                "round": metrics["round"],
                "experts": [spec.evaluate(e, test)[spec.metric] for e in experts],
                "top1": result.ensemble.score(test, 1)[spec.metric],
                "upload_bytes": [u.nbytes for u in uploads],
            }
        )

    run = run_federation(
        spec, config, clients, on_round, f"{partition} experts" if progress else None, engine
    )
    result.experts = list(result.rounds[-1]["experts"])
    n = len(result.ensemble.paths)
    result.final = {f"top{k}": result.ensemble.score(test, min(k, n))[spec.metric] for k in experiment.top_ks}
    if generative(spec):
        score_flows(spec, experiment, result, experts, test)
        result.ensembles = {
            kind: result.ensemble
            if kind == experiment.router
            else make_ensemble(kind, spec, engine, shards, config.seed)[0]
            for kind in ROUTERS
        }
    branched = result.rounds[experiment.shared_rounds :]
    result.clients = [
        client_footprint(engine, c["client"])
        | {"upload_bytes_per_round": statistics.fmean(r["upload_bytes"][i] for r in branched)}
        for i, c in enumerate(run.clients)
    ]
    return result


def score_flows(spec: Spec, experiment: Experiment, result: RunResult, experts: list, test: Examples) -> None:
    """A generative spec's final scores: the Fréchet distance of samples of each expert alone and of the
    routed ensemble's `mixture_samples`."""
    n, steps, solver, seed = (
        experiment.samples,
        experiment.sample_steps,
        experiment.solver,
        experiment.config.seed,
    )
    result.experts = [
        score_samples(result, f"expert {i}", sample_model(e, spec.prior, n, steps, solver, seed), spec, test)
        for i, e in enumerate(experts)
    ]
    for name, drawn in mixture_samples(result.ensemble, experiment.top_ks, n, steps, solver, seed).items():
        result.final[name] = score_samples(result, name, drawn, spec, test)


def mixture_samples(
    ensemble: Ensemble, top_ks: Sequence[int], n: int, steps: int, solver: str, seed: int
) -> dict[str, torch.Tensor]:
    """Samples of a routed flow ensemble drawn with the same noise: mixing the top-k experts at every step
    ("top1", "top2", ...; all of them at k = the number of paths), one expert re-sampled from the router
    per sample and step ("resample"), and one expert per sample drawn with Gumbel noise held over the path
    ("held")."""
    n_paths = len(ensemble.paths)
    drawn = {f"top{k}": sample(ensemble, n, steps, solver, min(k, n_paths), seed=seed) for k in top_ks}
    drawn["resample"] = sample(ensemble, n, steps, solver, resample=True, seed=seed)
    drawn["held"] = sample(ensemble, n, steps, solver, hold=True, seed=seed)
    return drawn


def sampler_sweep(
    spec: Spec, experiment: Experiment, ensemble: Ensemble, settings: Sequence[tuple[str, int]], seed: int
) -> dict[tuple[str, int], dict[str, float]]:
    """The Fréchet distance of a routed flow ensemble's `mixture_samples` (`experiment.samples` of them, from
    the noise of `seed`) on the spec's held-out examples, for each (solver, steps) setting."""
    test = eval_examples(spec)
    return {
        (solver, steps): {
            name: spec.sample_metrics(drawn, test)["fd"]
            for name, drawn in mixture_samples(
                ensemble, experiment.top_ks, experiment.samples, steps, solver, seed
            ).items()
        }
        for solver, steps in settings
    }


def client_footprint(engine: Engine, client_id: str) -> dict[str, Any]:
    """A client's path, variant and the bytes it stores for its weights (its first round's sub-model)."""
    a = engine.assignments[client_id]
    path_model = engine.model.compose(a.path)
    masks = round_masks(path_model, a.variant, 0, 0)
    return {
        "path": str(a.path),
        "variant": a.variant.name,
        "weight_bytes": variant_bytes(path_model, a.variant, masks)["weights"],
    }


@dataclass
class Comparison:
    """The dense baseline and the experts on each partition, once per seed."""

    spec: Spec
    experiment: Experiment
    dense: list[RunResult]
    experts: dict[str, list[RunResult]]

    @property
    def metric(self) -> str:
        """What the table shows: the spec's metric, or for a generative spec the Fréchet distance."""
        return "fd" if generative(self.spec) else self.spec.metric

    def rows(self) -> dict[str, dict[str, list[float]]]:
        """Per-seed values of each row of the demo table, per partition."""
        rows: dict[str, dict[str, list[float]]] = {
            "dense baseline": {p: [r.final["dense"] for r in self.dense] for p in self.experts}
        }
        for i in range(self.experiment.config.n_paths):
            rows[f"expert {i} alone"] = {p: [r.experts[i] for r in runs] for p, runs in self.experts.items()}
        rows["router: shard accuracy"] = {
            p: [r.router_accuracy for r in runs] for p, runs in self.experts.items()
        }
        n = self.experiment.config.n_paths
        for k in self.experiment.top_ks:
            name = "full ensemble" if k == n and k > 2 else f"ensemble top-{k}"
            rows[name] = {p: [r.final[f"top{k}"] for r in runs] for p, runs in self.experts.items()}
        if generative(self.spec):
            rows["one expert re-sampled per step"] = {
                p: [r.final["resample"] for r in runs] for p, runs in self.experts.items()
            }
            rows["one expert drawn per sample, held"] = {
                p: [r.final["held"] for r in runs] for p, runs in self.experts.items()
            }
        return rows


def compare(spec: Spec | str, experiment: Experiment, seeds: int = 1, progress: bool = True) -> Comparison:
    """Dense baseline vs experts on clustered and on random shards, at equal total steps,
    for seeds 0..seeds-1.
    """
    spec = load_spec(spec)
    comparison = Comparison(spec, experiment, [], {p: [] for p in PARTITIONS})
    for seed in range(seeds):
        seeded = replace(
            experiment, config=experiment.config.model_copy(update={"seed": experiment.config.seed + seed})
        )
        dense = train_dense(spec, seeded, seeded.steps_per_round, progress)
        comparison.dense.append(dense)
        for partition in PARTITIONS:
            comparison.experts[partition].append(train_experts(spec, seeded, partition, progress, dense))
    return comparison
