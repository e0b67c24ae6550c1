"""Tasks bind a data set, a model family and a metric: what the runners and the demo train on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmoe.data import Split, lm_eval_split, load_bible_documents, load_digits_split, sample_windows, split_documents, text_features
from fedmoe.models import ModelSpec
from fedmoe.train import Batch


@dataclass(frozen=True)
class Task:
    """Training units (images, documents) with routing features, a test split and a batch sampler."""

    name: str
    family: str
    metric: str  # "accuracy" (higher is better) or "bits_per_byte" (lower is better)
    features: np.ndarray
    test: Split
    sample: Callable[[np.ndarray, int, torch.Generator], Batch]
    model_config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        """Number of units the partitioners split into shards."""
        return len(self.features)

    def model_spec(self, grid: tuple[int, ...]) -> ModelSpec:
        """The model family of this task on the given grid."""
        return ModelSpec(self.family, grid, dict(self.model_config))

    def batches(self, units: np.ndarray, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless stream of training batches drawn from the given units."""
        generator = torch.Generator().manual_seed(seed)
        units = np.asarray(units)
        while True:
            yield self.sample(units, batch_size, generator)


def score(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of the argmax and mean negative log-likelihood in bits (bits per byte for byte LMs)."""
    p = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12)
    return {"accuracy": (probs.argmax(-1) == targets).float().mean().item(), "bits_per_byte": (-p.log2()).mean().item()}


def digits_task(seed: int = 0, hidden: int = 32, depth: int = 2) -> Task:
    """8x8 handwritten digits (scikit-learn's bundled copy), a small MLP classifier."""
    train, test = load_digits_split(seed=seed)

    def sample(units: np.ndarray, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.as_tensor(units)[torch.randint(len(units), (batch_size,), generator=generator)]
        return train.inputs[idx], train.targets[idx]

    return Task("digits", "mlp", "accuracy", train.features, test, sample, {"hidden": hidden, "depth": depth})


def bible_task(context: int = 64, eval_windows: int = 256, d_model: int = 64, n_layers: int = 2) -> Task:
    """King James Bible chapters as documents, a byte-level transformer language model."""
    train_docs, test_docs = split_documents(load_bible_documents())
    test = lm_eval_split(test_docs, eval_windows, context)

    def sample(units: np.ndarray, batch_size: int, generator: torch.Generator) -> Batch:
        windows = sample_windows([train_docs[i] for i in units], batch_size, context + 1, generator)
        return windows[:, :-1], windows[:, 1:]

    features = text_features([doc.text for doc in train_docs])
    config = {"d_model": d_model, "n_layers": n_layers, "n_heads": 4, "context": context}
    return Task("bible", "byte-lm", "bits_per_byte", features, test, sample, config)


TASKS: dict[str, Callable[[], Task]] = {"digits": digits_task, "bible": bible_task}


def load_task(name: str) -> Task:
    """A task by name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()
