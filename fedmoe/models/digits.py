"""The built-in digits spec: scikit-learn's bundled 8x8 handwritten digits, a small MLP classifier.

Client i of n holds k-means cluster i of the training split (and the test examples nearest to it), so each
client's data is about one thing, as in a federation of unlike data owners. The coordinator may evaluate on
a fixed 20% of the test split (`eval_data`); it never loads the training split.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from fedmoe.data import client_parts, load_digits_split
from fedmoe.models.classifier import mlp_levels
from fedmoe.spec import ClientData, Examples, Spec


@lru_cache(maxsize=1)
def _splits() -> tuple[Examples, Examples]:
    return load_digits_split()


@lru_cache(maxsize=4)
def _parts(partitions: int) -> list:
    train, test = _splits()
    return client_parts(train.inputs.numpy(), test.inputs.numpy(), partitions)


def client_data(partition: int, partitions: int) -> ClientData:
    """Client `partition` of `partitions`: one k-means cluster of the training digits,
    and the nearby test digits.
    """
    if not 0 <= partition < partitions:
        raise ValueError(f"partition must be in 0..{partitions - 1}, got {partition}")
    train, test = _splits()
    mine, held_out = _parts(partitions)[partition]
    return ClientData(train.subset(mine), test.subset(held_out))


def eval_data() -> Examples:
    """The whole test split (540 digits): held out, never trained on."""
    return _splits()[1]


spec = Spec(
    name="digits",
    levels=mlp_levels(in_dim=64, hidden=32, depth=2, classes=10),
    data=client_data,
    eval_data=eval_data,
)

# the same task with a wide MLP (2048 hidden units, three hidden layers; 8.5M parameters): for measuring what
# sub-models save (`fedmoe memory`, bench/heterogeneity.py)
wide = replace(spec, name="digits-wide", levels=mlp_levels(in_dim=64, hidden=2048, depth=3, classes=10))
