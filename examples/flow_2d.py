"""A user's own flow model: rectified flow on a 2-D mixture of 8 Gaussians on a circle (generated data).

Each client holds the points of one cluster (as fedmoe's federated k-means finds them), so each expert learns
one Gaussian's flow and the routed ensemble mixes their velocities by p(k | x_t, t), which
`fedmoe.flow.posterior_router` makes from the federated clusters' statistics (exact for Gaussians):

    fedmoe demo --spec examples.flow_2d:spec --grid 8 --shared-rounds 0
"""

import math
from functools import lru_cache

import numpy as np
import torch

from fedmoe import ClientData, Spec
from fedmoe.clustering import federated_kmeans, nearest
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
from fedmoe.frechet import frechet_distance, mix_distance

MEANS = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)])


def points(n: int, seed: int) -> torch.Tensor:
    """n points of the mixture: a Gaussian of spread 0.1 around each of the 8 means, chosen uniformly."""
    g = torch.Generator().manual_seed(seed)
    return MEANS[torch.randint(8, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)


TRAIN, TEST = data_examples(points(4000, 0)), data_examples(points(1000, 1))


@lru_cache(maxsize=4)
def clusters(partitions: int) -> list[np.ndarray]:
    """The cluster of each training and test point, as the federation's k-means finds them."""
    train, test = (flow_features(e.inputs).double().numpy() for e in (TRAIN, TEST))
    centroids = federated_kmeans([train], partitions, max_iter=100).centroids
    return [nearest(x, centroids) for x in (train, test)]


def client_data(partition: int, partitions: int) -> ClientData:
    """Simulated clients: client i of n holds cluster i of the points (a real client loads its own)."""
    mine, held_out = (np.flatnonzero(labels == partition) for labels in clusters(partitions))
    return ClientData(TRAIN.subset(mine), TEST.subset(held_out))


def sample_metrics(samples: torch.Tensor, examples) -> dict[str, float]:
    """Fréchet distance in the plane, and the total variation between the shares of the 8 Gaussians."""
    real = data_points(examples)
    share = [torch.cdist(x, MEANS).argmin(1) for x in (samples, real)]
    return {"fd": frechet_distance(samples, real), "mode_mix_tv": mix_distance(*share, 8)}


spec = Spec(
    name="flow-2d",
    levels=[lambda: VelocityMLP(2, hidden=64, depth=3, time_dim=16)],
    loss=velocity_loss,
    featurize=flow_features,
    metrics=velocity_metrics,
    metric="velocity_mse",
    mix="values",
    data=client_data,
    eval_data=lambda: TEST,
    prepare=noise_pairs,
    prior=gaussian_prior(2),
    sample_metrics=sample_metrics,
    cluster_router=posterior_router,
)
