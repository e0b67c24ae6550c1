"""Plain data containers shared by the loaders and the partitioners."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Split:
    """Model inputs and targets of a set of examples, with the features the router and partitioners see."""

    inputs: torch.Tensor
    targets: torch.Tensor
    features: np.ndarray

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.targets)


@dataclass(frozen=True)
class Document:
    """A named text (one Bible chapter)."""

    name: str
    text: str
