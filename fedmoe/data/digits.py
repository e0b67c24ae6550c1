"""scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedmoe.data.types import Split


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(x), torch.from_numpy(y), x.copy())


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[Split, Split]:
    """Stratified train/test split of the digits, pixels scaled to [0, 1]; features are the pixels."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return _split(x_train, y_train), _split(x_test, y_test)
