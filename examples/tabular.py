"""A tabular classifier with a user-written MLP, on data fedmoe does not ship (scikit-learn's make_classification).

    fedmoe server --spec examples.tabular:spec --grid 3
    fedmoe client --spec examples.tabular:spec --partition 0 --partitions 3
"""

from functools import lru_cache

import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch import nn

from fedmoe import ClientData, Examples, Spec
from fedmoe.data import client_part


@lru_cache(maxsize=1)
def table() -> tuple[Examples, Examples]:
    """4,000 rows, 20 features, 4 classes; a fixed 75/25 train/test split."""
    x, y = make_classification(n_samples=4000, n_features=20, n_informative=12, n_redundant=4, n_classes=4,
                               n_clusters_per_class=2, class_sep=1.5, random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    as_examples = lambda x, y: Examples(torch.tensor(x, dtype=torch.float32), torch.tensor(y))  # noqa: E731
    return as_examples(x_train, y_train), as_examples(x_test, y_test)


def client_data(partition: int, partitions: int) -> ClientData:
    """This client's rows: one k-means cluster of the table, and the test rows nearest to it."""
    train, test = table()
    mine, held_out = client_part(train.inputs.numpy(), test.inputs.numpy(), partition, partitions)
    return ClientData(train.subset(mine), test.subset(held_out))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


spec = Spec(name="tabular", levels=[mlp], data=client_data, eval_data=lambda: table()[1])
