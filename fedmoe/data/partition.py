"""Partitioners of N training units into K shards (one expert per shard)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans


@dataclass(frozen=True, eq=False)
class Clustering:
    """Shards found by clustering features, with the mean feature vector of each shard."""

    shards: list[np.ndarray]
    centroids: np.ndarray


def shard_sizes(shards: list[np.ndarray]) -> list[int]:
    """Number of units in each shard."""
    return [len(s) for s in shards]


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} units into {k} non-empty shards (need 1 <= k <= n)")


def _shards(assignment: np.ndarray, k: int) -> list[np.ndarray]:
    shards = [np.flatnonzero(assignment == j).astype(np.int64) for j in range(k)]
    if any(len(s) == 0 for s in shards):
        raise ValueError(f"a shard came out empty (sizes {shard_sizes(shards)}); use fewer shards")
    return shards


def _clustering(features: np.ndarray, assignment: np.ndarray, k: int) -> Clustering:
    shards = _shards(assignment, k)
    centroids = np.stack([features[s].mean(axis=0) for s in shards]).astype(np.float32)
    return Clustering(shards, centroids)


def iid(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Random shards of near-equal size (sizes differ by at most 1)."""
    _check(n, k)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, k)]


def dirichlet(labels: np.ndarray, k: int, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Label-skewed shards: each class is spread over the shards by proportions drawn from Dir(alpha)."""
    labels = np.asarray(labels)
    _check(len(labels), k)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(idx)).astype(np.int64)[:-1]
        for j, part in enumerate(np.split(idx, cuts)):
            assignment[part] = j
    counts = np.bincount(assignment, minlength=k)
    for j in np.flatnonzero(counts == 0):  # an empty shard takes one unit from the largest shard
        donor = int(np.argmax(counts))
        assignment[rng.choice(np.flatnonzero(assignment == donor))] = j
        counts[donor] -= 1
        counts[j] = 1
    return _shards(assignment, k)


def kmeans(features: np.ndarray, k: int, seed: int = 0) -> Clustering:
    """Shards by k-means clustering of the features."""
    _check(len(features), k)
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    return _clustering(features, model.labels_, k)


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _balanced_assign(d2: np.ndarray) -> np.ndarray:
    """Greedy over (point, centroid) pairs by distance: sizes floor(n/k), n % k of them one larger."""
    n, k = d2.shape
    floor, extra = divmod(n, k)
    points, cents = np.divmod(np.argsort(d2, axis=None, kind="stable"), k)
    assignment = [-1] * n
    counts = [0] * k
    free = n
    for p, c in zip(points.tolist(), cents.tolist()):
        if assignment[p] >= 0:
            continue
        if counts[c] == floor:
            if extra == 0:
                continue
            extra -= 1
        elif counts[c] > floor:
            continue
        assignment[p] = c
        counts[c] += 1
        free -= 1
        if free == 0:
            break
    return np.asarray(assignment, dtype=np.int64)


def balanced_kmeans(features: np.ndarray, k: int, seed: int = 0, iterations: int = 10) -> Clustering:
    """Equal-size k-means (sizes differ by at most 1):
    KMeans start, then capacity-constrained greedy rounds.
    """
    _check(len(features), k)
    x = np.asarray(features, dtype=np.float64)
    start = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(np.asarray(features, dtype=np.float32))
    centroids = start.cluster_centers_.astype(np.float64)
    assignment = np.full(len(x), -1, dtype=np.int64)
    for _ in range(iterations):
        new = _balanced_assign(_squared_distances(x, centroids))
        if np.array_equal(new, assignment):
            break
        assignment = new
        centroids = np.stack([x[assignment == j].mean(axis=0) for j in range(k)])
    return _clustering(np.asarray(features), assignment, k)


def nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each row of `features`."""
    return _squared_distances(
        np.asarray(features, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    ).argmin(1)


def client_parts(
    train_features: np.ndarray,
    test_features: np.ndarray | None,
    partitions: int,
    how: str = "clustered",
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The indices of the training (and held-out) units each of `partitions` simulated clients holds.

    "clustered": client i holds k-means cluster i of the training units (k = partitions) and the held-out
    units nearest to that cluster's centroid, so each client's data is about one thing; "iid": equal random
    parts.
    For specs that simulate clients on a bundled data set; a real client simply loads what it has.
    """
    if how == "clustered":
        clusters = kmeans(train_features, partitions, seed=seed)
        nearest_test = None if test_features is None else nearest(test_features, clusters.centroids)
        return [
            (shard, None if nearest_test is None else np.flatnonzero(nearest_test == i))
            for i, shard in enumerate(clusters.shards)
        ]
    if how == "iid":
        tests = (
            [None] * partitions if test_features is None else iid(len(test_features), partitions, seed=seed)
        )
        return list(zip(iid(len(train_features), partitions, seed=seed), tests))
    raise ValueError(f"unknown partitioning {how!r}; known: clustered, iid")
