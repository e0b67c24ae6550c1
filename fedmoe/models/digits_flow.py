"""The built-in flow spec: a rectified-flow model of scikit-learn's bundled 8x8 digits (pixels in [-1, 1]).

Client i of n holds cluster i of the training digits as fedmoe's federated k-means finds it (and the test
digits of that cluster), so that routing by data gives each client the one path of its cluster and each
expert learns the flow of one cluster's digits, as in Decentralized Diffusion Models. The router is
p(cluster | x_t, t) of the clusters taken as Gaussians, made from federated k-means' statistics of the
clusters (`fedmoe.flow.posterior_router`): no router is trained and no example leaves its client for it.
Samples score by Fréchet distance in the feature space of a frozen digits classifier that ships with fedmoe
(`fedmoe.frechet.digit_quality`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedmoe.clustering import federated_kmeans, nearest
from fedmoe.config import RoutingConfig
from fedmoe.data import load_digits_split
from fedmoe.flow import (
    VelocityMLP,
    data_examples,
    data_points,
    flow_features,
    gaussian_prior,
    noise_pairs,
    posterior_router,
    velocity_loss,
    velocity_metrics,
)
from fedmoe.frechet import digit_quality
from fedmoe.spec import ClientData, Examples, Spec


@lru_cache(maxsize=1)
def _splits() -> tuple[Examples, Examples]:
    train, test = load_digits_split()
    return data_examples(2 * train.inputs - 1), data_examples(2 * test.inputs - 1)


@lru_cache(maxsize=4)
def _parts(partitions: int) -> list[tuple[np.ndarray, np.ndarray]]:
    train, test = (flow_features(examples.inputs).double().numpy() for examples in _splits())
    clusters = federated_kmeans([train], partitions, max_iter=RoutingConfig().max_iter)
    labels = [nearest(x, clusters.centroids, clusters.prices) for x in (train, test)]
    return [tuple(np.flatnonzero(found == i) for found in labels) for i in range(partitions)]


def client_data(partition: int, partitions: int) -> ClientData:
    """Client `partition` of `partitions`: one cluster of the training digits and of the test digits, as
    flow examples (the points at t = 0)."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition must be in 0..{partitions - 1}, got {partition}")
    train, test = _splits()
    mine, held_out = _parts(partitions)[partition]
    return ClientData(train.subset(mine), test.subset(held_out))


def eval_data() -> Examples:
    """The whole test split (540 digits): held out, never trained on."""
    return _splits()[1]


def sample_metrics(samples, examples: Examples) -> dict[str, float]:
    """Generated digits against held-out ones (see `fedmoe.frechet.digit_quality`)."""
    return digit_quality(samples, data_points(examples))


spec = Spec(
    name="digits-flow",
    levels=[lambda: VelocityMLP(64, hidden=128, depth=3)],
    loss=velocity_loss,
    featurize=flow_features,
    metrics=velocity_metrics,
    metric="velocity_mse",
    mix="values",
    data=client_data,
    eval_data=eval_data,
    prepare=noise_pairs,
    prior=gaussian_prior(64),
    sample_metrics=sample_metrics,
    cluster_router=posterior_router,
)
