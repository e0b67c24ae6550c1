"""scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedmoe.spec import Examples


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[Examples, Examples]:
    """Stratified train/test split of the digits (inputs: 64 pixels scaled to [0, 1], float32;
    targets: int64).
    """
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Examples(torch.from_numpy(x_train), torch.from_numpy(y_train)), Examples(
        torch.from_numpy(x_test), torch.from_numpy(y_test)
    )
