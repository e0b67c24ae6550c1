"""Sample quality without downloads: Fréchet distance in a fixed feature space, and distances between mixes.

The Fréchet distance between two sets is that between Gaussians fitted to their features (FID's formula):
|m_a - m_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). For 8x8 digits the features are the penultimate layer of
a small digits classifier that ships with fedmoe, trained once and frozen (`DIGIT_FEATURES`; rebuild it with
`train_digit_classifier` and `save_digit_classifier`); raw pixels work for any data. The mix distance is
the total variation between the shares of classes (by that classifier) or clusters of two sets.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

DIGIT_FEATURES = Path(__file__).resolve().parent / "models" / "digit_features.safetensors"


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature rows (float64)."""
    a, b = (np.asarray(torch.as_tensor(x).detach().double().flatten(1)) for x in (a, b))
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"two sets of at least 2 rows of equal width, got {a.shape} and {b.shape}")
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (S_a S_b)^(1/2) = sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def mix_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, classes: int) -> float:
    """Total variation between the shares of each of `classes` labels in two label sets (0: the same mix)."""
    shares = [np.bincount(np.asarray(x), minlength=classes) / max(len(x), 1) for x in (a, b)]
    return float(0.5 * np.abs(shares[0] - shares[1]).sum())


class DigitClassifier(nn.Module):
    """A small classifier of 8x8 digits with pixels in [-1, 1]; its penultimate layer is the feature space."""

    def __init__(self, hidden: int = 128, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of digits (N, 64) or (N, 1, 8, 8)."""
        return self.body(x.flatten(1).float())

    @torch.no_grad()
    def classes(self, x: torch.Tensor) -> torch.Tensor:
        """The digit each image shows, by this classifier."""
        return self(x.float()).argmax(-1)


def train_digit_classifier(steps: int = 3000, seed: int = 0) -> DigitClassifier:
    """Train the feature classifier on the training split of the bundled digits (pixels scaled to [-1, 1])."""
    from fedmoe.data import load_digits_split

    train = load_digits_split()[0]
    x, y = 2 * train.inputs - 1, train.targets
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def save_digit_classifier(model: DigitClassifier, path: str | Path = DIGIT_FEATURES) -> Path:
    """Write the classifier's weights (safetensors)."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


@lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The frozen classifier that ships with fedmoe (`DIGIT_FEATURES`)."""
    model = DigitClassifier()
    model.load_state_dict(load_file(str(DIGIT_FEATURES)))
    return model.eval().requires_grad_(False)


def digit_quality(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Generated 8x8 digits (pixels in [-1, 1]) against real ones: Fréchet distance in the classifier's
    feature space ("fd") and in pixels ("fd_pixels"), and the total variation between their digit mixes."""
    classifier = digit_classifier()
    samples, reference = samples.flatten(1).float(), reference.flatten(1).float()
    return {
        "fd": frechet_distance(classifier.features(samples), classifier.features(reference)),
        "fd_pixels": frechet_distance(samples, reference),
        "class_mix_tv": mix_distance(classifier.classes(samples), classifier.classes(reference), 10),
    }
