"""The demo experiment: a dense baseline against routed ensembles of experts, at equal total training steps."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedmoe.data import balanced_kmeans, iid, kmeans
from fedmoe.ensemble import Ensemble
from fedmoe.federation import Assignment, WorkerStats, cosine_schedule, train_federation
from fedmoe.modular import ModularModel, Path, module_key
from fedmoe.outer import ModuleStates, OuterOptimizer
from fedmoe.router import CentroidRouter, LearnedRouter, shard_labels
from fedmoe.tasks import Task, score
from fedmoe.assignment import PROFILES, assign_variant
from fedmoe.train import InnerConfig
from fedmoe.worker import round_masks, variant_bytes

PARTITIONS = ("clustered", "random")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the grid (its paths are the shards), rounds, inner and outer settings, router kind.

    The first `shared_rounds` of the `rounds` train one shared model on all the data (as many steps
    per round as all workers together, so every round costs the same); every path then branches
    from it, as in Branch-Train-Merge and DiPaCo, and trains on its own shard for the remaining rounds.
    `profiles` names device profiles (see fedmoe.assignment.PROFILES): each path is then
    trained by one client per profile, each holding the variant (bits, density) its profile fits,
    with sub-models chosen by `scheme`.

    With one worker per path, DiLoCo's outer Nesterov step (lr 0.7, momentum 0.9: the
    `OuterOptimizer` defaults, meant for several workers per module) overshoots the worker's own end
    point and made every contender worse on digits, so experiments default to lr 1.0 without
    momentum: each outer step then lands exactly on the (averaged) end point.
    """

    grid: tuple[int, ...] = (4,)
    rounds: int = 10
    shared_rounds: int = 3
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    clustering: str = "kmeans"
    router: str = "learned"
    lr_schedule: str = "cosine"
    profiles: tuple[str, ...] = ()
    scheme: str = "rolling"
    seed: int = 0

    @property
    def n_paths(self) -> int:
        """Number of paths, hence of shards and of experts in the ensemble."""
        return int(np.prod(self.grid))

    @property
    def workers_per_path(self) -> int:
        """Clients per path: one per device profile (each path's shard is split among them), or one."""
        return max(1, len(self.profiles))

    @property
    def steps_per_round(self) -> int:
        """Inner steps of all workers in one round: what the dense baseline gets per round."""
        return self.inner.steps * self.n_paths * self.workers_per_path

    @property
    def top_ks(self) -> list[int]:
        """The mixtures evaluated: top-1, top-2 and the full ensemble."""
        return sorted({1, min(2, self.n_paths), self.n_paths})


@dataclass
class RunResult:
    """Metric per round and at the end, for a dense model or for experts and their ensembles."""

    name: str
    rounds: list[dict[str, float | list[float]]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    experts: list[float] = field(default_factory=list)
    router_accuracy: float | None = None
    ensemble: Ensemble | None = None
    model: ModularModel | None = None
    steps_per_round: int | None = None
    shared_state: ModuleStates | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)


def branch(states: ModuleStates, grid: tuple[int, ...]) -> ModuleStates:
    """Module states that start every module of each level of `grid` from a one-module-per-level model's module of that level."""
    return {module_key(level, m): states[module_key(level, 0)] for level, n in enumerate(grid) for m in range(n)}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, task: Task) -> float:
    """The task's metric for one model on the whole test split."""
    model.eval()
    return score(torch.softmax(model(task.test.inputs).float(), -1), task.test.targets)[task.metric]


def evaluate_ensemble(ensemble: Ensemble, task: Task, top_k: int) -> float:
    """The task's metric for the routed top-k mixture on the test split."""
    prediction = ensemble.predict(task.test.inputs, torch.as_tensor(task.test.features), top_k=top_k)
    return score(prediction.probs, task.test.targets)[task.metric]


def lr_scale(config: ExperimentConfig, offset: int = 0) -> Callable[[int], float] | None:
    """The inner learning-rate schedule over the whole run (None for a constant rate)."""
    if config.lr_schedule == "constant":
        return None
    if config.lr_schedule == "cosine":
        return cosine_schedule(config.rounds, offset)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; known: constant, cosine")


def outer_optimizer(model: ModularModel, config: ExperimentConfig) -> OuterOptimizer:
    """The DiLoCo outer optimiser for a grid, with the experiment's settings."""
    return OuterOptimizer(model, lr=config.outer_lr, momentum=config.outer_momentum)


def train_dense(task: Task, config: ExperimentConfig, steps_per_round: int, progress: bool = True, rounds: int | None = None) -> RunResult:
    """One model on all the data, `steps_per_round` inner steps per round, same schedule and outer step.

    The model is cut into len(config.grid) levels of one module each (the same function as an uncut
    model) and its state after `config.shared_rounds` rounds is kept, so that it can seed the grid.
    """
    levels = len(config.grid)
    model = task.model_spec((1,) * levels).build(config.seed)
    result = RunResult("dense", model=model, steps_per_round=steps_per_round)
    path = Path((0,) * levels)
    dense = model.compose(path)

    def on_round(r: int, losses: list[float]) -> None:
        result.rounds.append({"round": r + 1, "dense": evaluate_model(dense, task)})
        if r + 1 == config.shared_rounds:
            result.shared_state = model.module_states()

    assignment = [Assignment(path, np.arange(task.n_units))]
    inner = replace(config.inner, steps=steps_per_round)
    train_federation(
        model, assignment, task, config.rounds if rounds is None else rounds, inner, outer_optimizer(model, config),
        config.seed, on_round, "dense" if progress else None, lr_scale(config),
    )
    result.final = {"dense": result.rounds[-1]["dense"]}
    return result


CLUSTERINGS = {"kmeans": kmeans, "balanced-kmeans": balanced_kmeans}


def make_shards(task: Task, partition: str, k: int, seed: int, clustering: str = "kmeans") -> tuple[list[np.ndarray], np.ndarray]:
    """Shards of the training units and their feature centroids: clustered (k-means or balanced k-means) or random."""
    if partition == "clustered":
        if clustering not in CLUSTERINGS:
            raise ValueError(f"unknown clustering {clustering!r}; known: {', '.join(CLUSTERINGS)}")
        clusters = CLUSTERINGS[clustering](task.features, k, seed=seed)
        return clusters.shards, clusters.centroids
    if partition == "random":
        shards = iid(task.n_units, k, seed=seed)
        return shards, np.stack([task.features[s].mean(0) for s in shards])
    raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")


def make_router(kind: str, task: Task, shards: list[np.ndarray], centroids: np.ndarray, seed: int) -> tuple[CentroidRouter | LearnedRouter, float]:
    """A router over the shards and its accuracy at naming the shard of a training unit."""
    labels = shard_labels(shards, task.n_units)
    if kind == "centroid":
        router = CentroidRouter(centroids)
        accuracy = (router.probs(torch.as_tensor(task.features)).argmax(-1).numpy() == labels).mean()
        return router, float(accuracy)
    if kind == "learned":
        torch.manual_seed(seed)
        router = LearnedRouter(task.features.shape[1], len(shards))
        return router, router.fit(task.features, labels, seed=seed)
    raise ValueError(f"unknown router {kind!r}; known: centroid, learned")


def train_experts(task: Task, config: ExperimentConfig, partition: str, progress: bool = True, dense: RunResult | None = None) -> RunResult:
    """Partition the data, give each shard a path, train all paths with DiLoCo, route and ensemble them.

    The paths branch from `dense` (a `train_dense` run at n_paths x the inner steps, whose first
    `shared_rounds` rounds are exactly the shared phase) or, when it is None, from a shared phase
    trained here.
    """
    if not 0 <= config.shared_rounds < config.rounds:
        raise ValueError(f"shared_rounds must be in 0..rounds-1, got {config.shared_rounds} of {config.rounds}")
    shards, centroids = make_shards(task, partition, config.n_paths, config.seed, config.clustering)
    router, router_accuracy = make_router(config.router, task, shards, centroids, config.seed)
    spec = task.model_spec(config.grid)
    model = spec.build(config.seed)
    paths = model.paths()
    ensemble = Ensemble(spec, model, paths, router)
    result = RunResult(partition, router_accuracy=router_accuracy, ensemble=ensemble)

    if config.shared_rounds:
        shared_steps = config.steps_per_round
        if dense is None:
            dense = train_dense(task, config, shared_steps, progress, rounds=config.shared_rounds)
        if dense.steps_per_round != shared_steps or dense.shared_state is None:
            raise ValueError(f"paths branch from a dense run of {shared_steps} steps per round with its shared state")
        model.load_module_states(branch(dense.shared_state, config.grid))
        result.rounds = [{"round": r["round"], "experts": [r["dense"]] * len(paths), "top1": r["dense"]} for r in dense.rounds[: config.shared_rounds]]

    def on_round(r: int, stats: list[WorkerStats]) -> None:
        result.rounds.append({
            "round": config.shared_rounds + r + 1,
            "experts": [evaluate_model(e, task) for e in ensemble.experts],
            "top1": evaluate_ensemble(ensemble, task, 1),
            "upload_bytes": [s.upload_bytes for s in stats],
        })

    assignments = assign_clients(model, paths, shards, config)
    result.clients = [client_footprint(model, a) for a in assignments]
    rounds = config.rounds - config.shared_rounds
    train_federation(
        model, assignments, task, rounds, config.inner, outer_optimizer(model, config), config.seed, on_round,
        f"{partition} experts" if progress else None, lr_scale(config, config.shared_rounds),
    )
    result.experts = list(result.rounds[-1]["experts"])
    result.final = {f"top{k}": evaluate_ensemble(ensemble, task, k) for k in config.top_ks}
    for i, client in enumerate(result.clients):
        client["upload_bytes_per_round"] = statistics.fmean(r["upload_bytes"][i] for r in result.rounds[config.shared_rounds :])
    return result


def assign_clients(model: ModularModel, paths: list[Path], shards: list[np.ndarray], config: ExperimentConfig) -> list[Assignment]:
    """One client per profile on each path, each with an equal random part of the path's shard and the variant its profile fits."""
    if not config.profiles:
        return [Assignment(path, units) for path, units in zip(paths, shards)]
    assignments = []
    for path, units in zip(paths, shards):
        path_model = model.compose(path)
        parts = iid(len(units), config.workers_per_path, seed=config.seed)
        for name, part in zip(config.profiles, parts):
            if name not in PROFILES:
                raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
            assignments.append(Assignment(path, units[part], assign_variant(PROFILES[name], path_model, config.scheme)))
    return assignments


def client_footprint(model: ModularModel, assignment: Assignment) -> dict[str, Any]:
    """A client's variant and the bytes it stores for its weights (its first round's sub-model)."""
    path_model = model.compose(assignment.path)
    masks = round_masks(path_model, assignment.variant, 0, 0)
    return {"path": str(assignment.path), "variant": assignment.variant.name, "weight_bytes": variant_bytes(path_model, assignment.variant, masks)["weights"]}


@dataclass
class Comparison:
    """The dense baseline and the experts on each partition, once per seed."""

    task: Task
    config: ExperimentConfig
    dense: list[RunResult]
    experts: dict[str, list[RunResult]]

    def rows(self) -> dict[str, dict[str, list[float]]]:
        """Per-seed values of each row of the demo table, per partition."""
        rows: dict[str, dict[str, list[float]]] = {"dense baseline": {p: [r.final["dense"] for r in self.dense] for p in self.experts}}
        for i in range(self.config.n_paths):
            rows[f"expert {i} alone"] = {p: [r.experts[i] for r in runs] for p, runs in self.experts.items()}
        rows["router: shard accuracy"] = {p: [r.router_accuracy for r in runs] for p, runs in self.experts.items()}
        for k in self.config.top_ks:
            name = "full ensemble" if k == self.config.n_paths and k > 2 else f"ensemble top-{k}"
            rows[name] = {p: [r.final[f"top{k}"] for r in runs] for p, runs in self.experts.items()}
        return rows


def compare(task: Task, config: ExperimentConfig, seeds: int = 1, progress: bool = True) -> Comparison:
    """Dense baseline vs experts on clustered and on random shards, at equal total steps, for seeds 0..seeds-1."""
    comparison = Comparison(task, config, [], {p: [] for p in PARTITIONS})
    for seed in range(seeds):
        seeded = replace(config, seed=config.seed + seed)
        dense = train_dense(task, seeded, config.steps_per_round, progress)
        comparison.dense.append(dense)
        for partition in PARTITIONS:
            comparison.experts[partition].append(train_experts(task, seeded, partition, progress, dense))
    return comparison
