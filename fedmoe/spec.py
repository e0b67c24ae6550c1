"""The user's problem, and nothing about the runner: a `Spec` named by import string ("package.module:attr").

A spec says how to build the model as a grid (per level, a factory of `nn.Module`s), how to train it
(loss, inner optimiser), how to route (a featurizer: inputs -> routing features), how to score and how
outputs mix in the ensemble, and, optionally, how a client loads its own data and which small held-out
set the coordinator may evaluate on. Every runner (in-process, gRPC, Flower) and `fedmoe serve` take the
same spec, so nothing in fedmoe has to be patched to train a new model.

    spec = Spec(
        name="tabular",
        levels=[lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))],
        data=my_client_data,          # (partition, partitions) -> ClientData, runs on the client
    )
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.modular import ModularModel, Path, split_evenly

Batch = tuple[torch.Tensor, torch.Tensor]
LevelFactories = Sequence[Callable[[], nn.Module]]
MIXES = ("probabilities", "values")


@dataclass(frozen=True, eq=False)
class Examples:
    """A set of examples as two tensors: `inputs[i]` and `targets[i]` are example i."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) or not isinstance(self.targets, torch.Tensor):
            raise TypeError(
                f"examples are two tensors (inputs, targets), got {type(self.inputs).__name__}, "
                f"{type(self.targets).__name__}"
            )
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor | Sequence[int]) -> Examples:
        """The examples at `index`."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Examples(self.inputs[index], self.targets[index])

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless stream of batches drawn uniformly with replacement, reproducible from `seed`."""
        return BatchSampler(self, batch_size, seed)


class BatchSampler:
    """The endless batch stream of `Examples.batches`; its generator state can be saved and restored."""

    def __init__(self, examples: Examples, batch_size: int, seed: int):
        if len(examples) == 0:
            raise ValueError("no examples to draw batches from")
        self.examples, self.batch_size = examples, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> Batch:
        idx = torch.randint(len(self.examples), (self.batch_size,), generator=self.generator)
        return self.examples.inputs[idx], self.examples.targets[idx]


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's own data: training examples and, optionally, held-out examples it evaluates on."""

    train: Examples
    test: Examples | None = None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last axis: (N, C) logits for classifiers, (N, T, V) for language models."""
    return F.cross_entropy(outputs.flatten(0, -2).float(), targets.flatten())


def classification_metrics(mixed: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of the argmax and mean negative log-likelihood in bits (bits per byte for byte LMs)."""
    p = mixed.gather(-1, targets.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12)
    return {
        "accuracy": (mixed.argmax(-1) == targets).float().mean().item(),
        "bits_per_byte": (-p.log2()).mean().item(),
    }


def flat_features(inputs: torch.Tensor) -> torch.Tensor:
    """The default featurizer: each input flattened to a float32 vector."""
    return inputs.reshape(len(inputs), -1).float()


def staged_levels(
    stages: Sequence[Callable[[], nn.Module]],
) -> Callable[[int], list[Callable[[], nn.Module]]]:
    """Levels cut from a stack of stage factories: for n levels,
    consecutive stages are split evenly into n groups.
    """

    def levels(n: int) -> list[Callable[[], nn.Module]]:
        groups = list(split_evenly(stages, n))
        return [lambda group=group: nn.Sequential(*(make() for make in group)) for group in groups]

    return levels


@dataclass(frozen=True, eq=False)
class Spec:
    """Everything fedmoe needs to know about a problem (see the module docstring).

    - `levels`: one factory per level (each call returns a fresh module), or a function of the number of
      levels returning them (a model that can be cut into any number of levels; see `staged_levels`).
      Module `m` of level `l` of a grid is `levels[l]()`; a path chains one module per level.
    - `loss(outputs, targets)`: default cross-entropy. `optimizer(params, lr=..., weight_decay=...)`: default
      AdamW.
    - `featurize(inputs)`: (N, F) float routing features, used by clustering and the router.
    - `metrics(mixed, targets)`: a dict of scores on mixed outputs; `metric` names the headline one.
    - `mix`: "probabilities" (softmax of each expert's outputs, mixed: classifiers and LMs) or "values"
      (raw outputs mixed, e.g. velocities of flow models).
    - `data(partition, partitions)`: a client's own `ClientData`; runs on clients only (None: clients bring
      data).
    - `eval_data()`: an optional small held-out `Examples` the coordinator evaluates on; never training data.
    - `encode_text(text)`: for language models, a prompt as model inputs (one example), for `fedmoe serve`.
    - `prepare(inputs, targets, generator)`: what a training step makes of a batch of examples, drawing any
      randomness from `generator` (a flow model noises its data points at random times: see
      `fedmoe.flow.noise_pairs`); the learned router learns the clusters of examples so prepared, and
      evaluation prepares held-out examples with a fixed seed. None: examples train as they are.
    - `prior(n, generator)`: for generative specs, n starting points of sampling (a flow model's noise at
      t = 1); `sample_metrics(samples, examples)`: scores of samples against held-out examples, with "fd"
      (a Fréchet distance, lower is better) among them.
    - `cluster_router(counts, means, covariances)`: a router made from the federated clusters' statistics
      (examples, the mean of the routing features and their covariance matrix, one per cluster) instead of
      their centroids: a flow spec's exact-for-Gaussians p(k | x_t, t) (`fedmoe.flow.posterior_router`). It
      needs no training and sees no example. A spec with one makes clustering gather the clusters' second
      moments in one more pass (full covariances; diagonal when k x width^2 / 2 exceeds 65,536 numbers).
    """

    name: str
    levels: LevelFactories | Callable[[int], LevelFactories]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
    featurize: Callable[[torch.Tensor], torch.Tensor] = flat_features
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = classification_metrics
    metric: str = "accuracy"
    mix: str = "probabilities"
    data: Callable[[int, int], ClientData] | None = None
    eval_data: Callable[[], Examples] | None = None
    encode_text: Callable[[str], torch.Tensor] | None = None
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Generator], Batch] | None = None
    prior: Callable[[int, torch.Generator], torch.Tensor] | None = None
    sample_metrics: Callable[[torch.Tensor, Examples], dict[str, float]] | None = None
    cluster_router: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None
    ref: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"spec {self.name!r}: mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if not callable(self.levels) and not self.levels:
            raise ValueError(f"spec {self.name!r}: give at least one level factory")

    def level_factories(self, n_levels: int) -> list[Callable[[], nn.Module]]:
        """The module factory of each of `n_levels` levels."""
        if callable(self.levels):
            return list(self.levels(n_levels))
        if len(self.levels) != n_levels:
            raise ValueError(
                f"spec {self.name!r} defines {len(self.levels)} level(s), the grid has {n_levels}: "
                f"give a grid of {len(self.levels)} number(s), e.g. {'x'.join(['2'] * len(self.levels))}"
            )
        return list(self.levels)

    @property
    def default_levels(self) -> int:
        """The number of levels a grid of this spec has when the spec fixes it, else 1."""
        return 1 if callable(self.levels) else len(self.levels)

    def build(self, grid: Sequence[int], seed: int = 0) -> ModularModel:
        """A freshly initialised grid; the same (spec, grid, seed) gives the same weights."""
        grid = tuple(int(n) for n in grid)
        if not grid or min(grid) < 1:
            raise ValueError(f"every level needs at least one module, got grid {grid}")
        factories = self.level_factories(len(grid))
        torch.manual_seed(seed)
        return ModularModel([[make() for _ in range(n)] for make, n in zip(factories, grid)])

    def build_path(self, path: Path, seed: int = 0, shapes_only: bool = False) -> nn.Sequential:
        """Only the modules of `path`, arranged as `build(grid).compose(path)` arranges them: what a client
        trains, without the rest of the grid (its weights come with its jobs). `shapes_only`: parameters on
        the meta device, never allocated (what a width sub-model is sliced from), unless the modules hold
        buffers, whose values only a real build computes."""
        factories = self.level_factories(len(path.modules))
        if shapes_only:
            with torch.device("meta"):
                model = nn.Sequential(*(make() for make in factories))
            if next(model.buffers(), None) is None:
                return model
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            torch.manual_seed(seed)
            return nn.Sequential(*(make() for make in factories))

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        """A model's raw outputs in the form they are mixed and scored in (probabilities or values)."""
        return F.softmax(raw.float(), dim=-1) if self.mix == "probabilities" else raw.float()

    @torch.no_grad()
    def features(self, examples: Examples, batch_size: int = 4096) -> np.ndarray:
        """The routing features of `examples`, (N, F) float64, computed in batches."""
        parts = [
            self.featurize(examples.inputs[start : start + batch_size]).double().numpy()
            for start in range(0, len(examples), batch_size)
        ]
        if not parts:
            raise ValueError("no examples to compute routing features of")
        return np.concatenate(parts)

    @torch.no_grad()
    def feature_statistics(self, examples: Examples, batch_size: int = 4096) -> tuple[np.ndarray, int]:
        """The sum of the routing features of `examples` (float64) and their number:
        what a client reports for routing.
        """
        total: np.ndarray | None = None
        for start in range(0, len(examples), batch_size):
            part = self.featurize(examples.inputs[start : start + batch_size]).double().sum(0).numpy()
            total = part if total is None else total + part
        if total is None:
            raise ValueError("no examples to compute routing statistics from")
        return total, len(examples)

    def prepared(self, examples: Examples, seed: int = 0) -> Examples:
        """`examples` as a training step sees them (`prepare`, its randomness drawn from `seed`); unchanged
        without `prepare`."""
        if self.prepare is None:
            return examples
        generator = torch.Generator().manual_seed(seed)
        return Examples(*self.prepare(examples.inputs, examples.targets, generator))

    def training_batches(self, batches: Iterator[Batch], seed: int) -> Iterator[Batch]:
        """`batches` as training steps see them (`prepare`, its randomness drawn from `seed`)."""
        if self.prepare is None:
            return batches
        generator = torch.Generator().manual_seed(seed)
        return (self.prepare(inputs, targets, generator) for inputs, targets in batches)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Examples) -> dict[str, float]:
        """The spec's metrics of one model (a path) on `examples` (prepared with a fixed seed)."""
        model.eval()
        examples = self.prepared(examples)
        return self.metrics(self.outputs(model(examples.inputs)), examples.targets)


def load_spec(ref: str | Spec) -> Spec:
    """The spec named by an import string "package.module:attr" (a `Spec`, or a function returning one).

    A `Spec` passes through. The returned spec remembers `ref`, so checkpoints can name it.
    """
    if isinstance(ref, Spec):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"a spec is named 'package.module:attr', got {ref!r} (e.g. fedmoe.models.digits:spec)"
        )
    try:
        module = _import(module_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import {module_name!r} for spec {ref!r}: {e} (is it installed, or on PYTHONPATH?)"
        ) from e
    try:
        value: Any = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (spec {ref!r})") from None
    if callable(value) and not isinstance(value, Spec) and _takes_no_arguments(value):
        value = value()
    if not isinstance(value, Spec):
        raise ValueError(f"{ref!r} is a {type(value).__name__}, not a fedmoe.Spec")  # noqa: TRY004 - callers catch ValueError
    return replace(value, ref=ref)


def _import(module_name: str) -> Any:
    """Import a module, looking in the working directory too (a user's project, as `python -m` would)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if cwd in sys.path or not (e.name and module_name.startswith(e.name)):
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def _takes_no_arguments(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
