"""A user's own tabular classifier: their MLP on their table (here scikit-learn's make_classification)."""

import torch
from sklearn.datasets import make_classification
from torch import nn

from fedmoe import ClientData, Examples, Spec
from fedmoe.data import client_parts

X, Y = make_classification(
    n_samples=4000,
    n_features=20,
    n_informative=12,
    n_redundant=4,
    n_classes=4,
    n_clusters_per_class=2,
    class_sep=1.5,
    random_state=0,
)
TRAIN = Examples(torch.tensor(X[:3000], dtype=torch.float32), torch.tensor(Y[:3000]))
TEST = Examples(torch.tensor(X[3000:], dtype=torch.float32), torch.tensor(Y[3000:]))


def client_data(partition: int, partitions: int) -> ClientData:
    """Simulated clients: client i of n holds k-means cluster i of the rows (a real client loads its own)."""
    mine, held_out = client_parts(TRAIN.inputs.numpy(), TEST.inputs.numpy(), partitions)[partition]
    return ClientData(TRAIN.subset(mine), TEST.subset(held_out))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


spec = Spec(name="tabular", levels=[mlp], data=client_data, eval_data=lambda: TEST)
