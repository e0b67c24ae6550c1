"""Federated k-means: clients send per-centroid sums and counts of their routing features, never rows.

Each step, the coordinator proposes centroids (and, for balanced k-means, a price per centroid); every
client assigns its own examples to the nearest one and answers a `ClusterStats`: per centroid, the
number of its examples, the sum of their features and the sum of their squares (per dimension). The
statistics of all clients add up to those of the union, so `FederatedKMeans` runs exactly Lloyd's
algorithm on data it never sees.

Seeding reveals nothing beyond those aggregates: it starts from one centroid (the federation's mean)
and splits, one at a time, the centroid with the largest within-cluster error into two, moved apart
along that cluster's per-dimension spread (Linde-Buzo-Gray splitting), running Lloyd's iterations to
convergence after each split. It is deterministic: the same data gives the same centroids however it
is spread over clients.

Second moments: a clustering made for a cluster router that needs them (`second_moments`) asks, once
converged, for one more pass against the final centroids in which clients also sum the outer products of
their features per cluster (the upper triangle: width x (width + 1) / 2 numbers per cluster), when those
fit in `MAX_MOMENT_VALUES`. They give each cluster's full covariance; still aggregates, never rows.

Balanced k-means: once Lloyd has converged with k centroids, the centroids stay and each gets a price
added to its squared distance, raised while it holds more than its share of the federation's examples
and lowered while it holds fewer (dual ascent on the size constraint), until the largest cluster is
within `balance_slack` of N / k. Clients then assign by distance plus price.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_MOMENT_VALUES = 1 << 16  # second moments a pass may ask each client for (k x the upper triangle)


@dataclass(frozen=True, eq=False)
class ClusterStats:
    """Per centroid: the examples nearest to it, counted, summed, and summed squared per dimension."""

    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    soft: np.ndarray | None = None  # with a softness: the summed soft assignments (balanced k-means' pricing)
    products: np.ndarray | None = None  # when asked: per cluster, the summed outer products (k, width, width)

    def __add__(self, other: ClusterStats) -> ClusterStats:
        soft = None if self.soft is None or other.soft is None else self.soft + other.soft
        products = None if self.products is None or other.products is None else self.products + other.products
        return ClusterStats(
            self.counts + other.counts, self.sums + other.sums, self.squares + other.squares, soft, products
        )

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cluster with examples: the counts, the means and the covariance matrices (full when the second
        moments were gathered, else diagonal), and which clusters those are."""
        counts = np.maximum(self.counts, 1.0)
        means = self.sums / counts[:, None]
        if self.products is not None:
            covariances = self.products / counts[:, None, None] - means[:, :, None] * means[:, None, :]
        else:
            covariances = np.stack([np.diag(v) for v in self.squares / counts[:, None] - means**2])
        return self.counts, means, covariances

    def check(self, k: int, width: int) -> None:
        """Raise ValueError unless these are finite statistics of `k` centroids over `width` features."""
        if self.counts.shape != (k,) or self.sums.shape != (k, width) or self.squares.shape != (k, width):
            raise ValueError(
                f"cluster statistics of shapes {self.counts.shape}, {self.sums.shape}, {self.squares.shape}; "
                f"expected ({k},), ({k}, {width}), ({k}, {width})"
            )
        if not (
            np.isfinite(self.counts).all()
            and np.isfinite(self.sums).all()
            and np.isfinite(self.squares).all()
        ):
            raise ValueError("cluster statistics must be finite")
        if (self.counts < 0).any() or (self.squares < 0).any():
            raise ValueError("cluster counts and sums of squares cannot be negative")
        if self.products is not None:
            if self.products.shape != (k, width, width) or not np.isfinite(self.products).all():
                raise ValueError(f"second moments must be finite, of shape ({k}, {width}, {width})")
            if not np.allclose(
                np.diagonal(self.products, axis1=1, axis2=2), self.squares, rtol=1e-6, atol=1e-9
            ):
                raise ValueError("second moments disagree with the sums of squares")


def squared_distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances, in float64."""
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def nearest(
    features: np.ndarray, centroids: np.ndarray | None, prices: np.ndarray | None = None
) -> np.ndarray:
    """The cluster of each row: the nearest centroid (squared distance plus its price); all 0 for None."""
    if centroids is None:
        return np.zeros(len(features), dtype=np.int64)
    d2 = squared_distances(features, centroids)
    return (d2 if prices is None else d2 + prices[None, :]).argmin(1)


def cluster_stats(
    features: np.ndarray,
    centroids: np.ndarray | None,
    prices: np.ndarray | None = None,
    softness: float = 0.0,
    products: bool = False,
) -> ClusterStats:
    """A client's answer to a proposal: its examples' statistics per nearest centroid (None: one cluster).

    With a softness (balanced k-means' pricing), also the sums of the soft assignments
    softmax(-(squared distance + price) / softness) over the centroids; with `products`, the sums of the
    outer products of the features per cluster (second moments).
    """
    x = np.asarray(features, dtype=np.float64)
    k = 1 if centroids is None else len(centroids)
    labels = nearest(x, centroids, prices)
    soft = None
    if softness > 0 and centroids is not None:
        logits = -(squared_distances(x, centroids) + (0.0 if prices is None else prices[None, :])) / softness
        logits -= logits.max(1, keepdims=True)
        weights = np.exp(logits)
        soft = (weights / weights.sum(1, keepdims=True)).sum(0)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, x.shape[1]))
    squares = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    np.add.at(squares, labels, x * x)
    outer = None
    if products:
        outer = np.stack([x[labels == c].T @ x[labels == c] for c in range(k)])
    return ClusterStats(counts, sums, squares, soft, outer)


def upper_triangles(products: np.ndarray) -> np.ndarray:
    """Second moments (k, width, width) as they travel: each cluster's upper triangle, row-major, flat."""
    width = products.shape[-1]
    return products[:, *np.triu_indices(width)].reshape(-1)


def from_upper_triangles(values: np.ndarray, k: int, width: int) -> np.ndarray:
    """Inverse of `upper_triangles`; ValueError for the wrong number of values."""
    values = np.asarray(values, dtype=np.float64)
    size = width * (width + 1) // 2
    if values.shape != (k * size,):
        raise ValueError(f"second moments of {k} clusters over {width} features are {k * size} values")
    rows, cols = np.triu_indices(width)
    products = np.zeros((k, width, width))
    products[:, rows, cols] = values.reshape(k, size)
    products[:, cols, rows] = values.reshape(k, size)
    return products


def histogram(features: np.ndarray, centroids: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """How many of a client's examples fall in each cluster: what it reports to be given a path."""
    return np.bincount(nearest(features, centroids, prices), minlength=len(centroids))


def members(
    features: np.ndarray, centroids: np.ndarray, prices: np.ndarray | None, cluster: int
) -> np.ndarray:
    """The indices of a client's examples that fall in `cluster`: what it trains the cluster's path on."""
    return np.flatnonzero(nearest(features, centroids, prices) == cluster)


def check_histogram(counts: object, k: int) -> np.ndarray:
    """A client's histogram as k non-negative whole counts, or ValueError."""
    values = np.asarray(counts, dtype=np.float64).reshape(-1)
    if values.shape != (k,) or not np.isfinite(values).all() or (values < 0).any() or (values % 1).any():
        raise ValueError(
            f"a histogram is {k} non-negative whole counts, one per cluster, got {values.tolist()[:8]}"
        )
    if values.sum() == 0:
        raise ValueError("a histogram of no examples: the client has nothing to train on")
    return values.astype(np.int64)


class FederatedKMeans:
    """The coordinator's side of federated k-means (see the module docstring).

    Loop: `proposal()` -> every client answers `cluster_stats(features, *proposal)` -> `update(sum of the
    answers)`, until `done`. Then `centroids`, `prices` (zeros unless balanced) and `temperature` (the mean
    squared distance of an example to its centroid: a router's softmax temperature on the data's own scale).
    """

    def __init__(
        self,
        k: int,
        tol: float = 1e-4,
        max_iter: int = 300,
        balanced: bool = False,
        balance_slack: float = 0.05,
        second_moments: bool = False,
    ):
        if k < 1:
            raise ValueError(f"k-means needs k >= 1, got {k}")
        self.k, self.tol, self.max_iter, self.balanced, self.balance_slack = (
            k,
            tol,
            max_iter,
            balanced,
            balance_slack,
        )
        self.centroids: np.ndarray | None = None  # None: the first proposal is "everything in one cluster"
        self.prices = np.zeros(0)
        self.done = False
        self.iterations = 0  # client passes so far
        self.stage_iterations = 0
        self.scale = 0.0  # mean per-dimension variance of the federation's features: the unit of `tol`
        self.temperature = 1.0
        self.pricing = False  # balanced k-means' last stage: centroids fixed, prices move
        self.softness = 0.0  # of the soft assignments the pricing asks for: a tenth of the temperature
        self.last: ClusterStats | None = None
        self.second_moments = second_moments  # gather them in one last pass (see the module docstring)
        self.gathering = False  # that pass is open

    def proposal(self) -> tuple[np.ndarray | None, np.ndarray | None, float, bool]:
        """The centroids, prices and softness clients compute their statistics against (None: one cluster),
        and whether they also sum their second moments (`cluster_stats`'s arguments after the features)."""
        if self.centroids is None:
            return None, None, 0.0, False
        return self.centroids, self.prices, self.softness if self.pricing else 0.0, self.gathering

    def update(self, stats: ClusterStats) -> bool:
        """Fold in the federation's statistics for the current proposal; return whether clustering is done."""
        if self.done:
            raise RuntimeError("federated k-means has already converged")
        stats.check(*((1, stats.sums.shape[-1]) if self.centroids is None else self.centroids.shape))
        self.iterations += 1
        self.stage_iterations += 1
        if self.gathering:
            if stats.products is None:
                raise ValueError("this pass asks for the second moments of the features")
            self.last, self.gathering, self.done = stats, False, True
            return True
        if self.centroids is None:  # the first pass: one cluster, the federation's moments
            total = stats.counts.sum()
            if total <= 0:
                raise ValueError("no examples to cluster")
            mean = stats.sums.sum(0) / total
            self.scale = float(np.mean(np.maximum(stats.squares.sum(0) / total - mean * mean, 0.0))) or 1.0
            self.centroids, self.prices, self.last = mean[None, :], np.zeros(1), stats
            return self._next_stage()
        self.last = stats
        if self.pricing:  # balanced: the centroids stay, each one's price moves its share toward N / k
            if self._balanced_enough(stats) or self.stage_iterations >= self.max_iter:
                return self._finish()
            self._reprice(stats)
            return False
        held = stats.counts > 0
        new = self.centroids.copy()
        new[held] = stats.sums[held] / stats.counts[held, None]
        shift = float(((new - self.centroids) ** 2).sum())
        self.centroids = new
        if not held.all():  # an empty cluster restarts by splitting the worst one
            self._split(np.flatnonzero(~held)[0])
            return False
        if shift <= self.tol * self.scale or self.stage_iterations >= self.max_iter:
            return self._next_stage()
        return False

    def _next_stage(self) -> bool:
        """After Lloyd converged: split the worst cluster while fewer than k; then price, or finish."""
        if len(self.centroids) < self.k:
            self.centroids = np.vstack([self.centroids, self.centroids[:1]])
            self.prices = np.append(self.prices, 0.0)
            self._split(len(self.centroids) - 1)
            return False
        self.temperature = self.temperature_estimate(self.last)
        if self.balanced and not self._balanced_enough(self.last):
            self.pricing, self.stage_iterations, self.softness = True, 0, 0.1 * self.temperature
            return False
        return self._finish()

    def _finish(self) -> bool:
        k, width = self.centroids.shape
        if self.second_moments and k * width * (width + 1) // 2 <= MAX_MOMENT_VALUES:
            self.gathering = True
            return False
        self.done = True
        return True

    def state(self) -> dict[str, object]:
        """The converged clustering as JSON (what a coordinator keeps across restarts)."""
        if not self.done:
            raise RuntimeError("federated k-means has not converged")
        return {
            "centroids": self.centroids.tolist(),
            "prices": self.prices.tolist(),
            "temperature": self.temperature,
            "iterations": self.iterations,
            "last": {
                name: getattr(self.last, name).tolist()
                for name in ("counts", "sums", "squares", "products")
                if getattr(self.last, name) is not None
            },
        }

    def restore(self, state: dict[str, object]) -> None:
        """Take a converged clustering saved by `state`."""
        self.centroids = np.asarray(state["centroids"], dtype=np.float64)
        self.prices = np.asarray(state["prices"], dtype=np.float64)
        self.temperature, self.iterations, self.done = (
            float(state["temperature"]),
            int(state["iterations"]),
            True,
        )
        if "last" in state:  # the converged clusters' statistics (a cluster router is made of them)
            last = state["last"]
            products = np.asarray(last["products"], np.float64) if "products" in last else None
            self.last = ClusterStats(
                *(np.asarray(last[n], np.float64) for n in ("counts", "sums", "squares")), products=products
            )

    def _errors(self, stats: ClusterStats) -> np.ndarray:
        """Each cluster's sum of squared distances to its mean."""
        counts = np.maximum(stats.counts, 1.0)
        return np.maximum(stats.squares.sum(1) - (stats.sums * stats.sums).sum(1) / counts, 0.0)

    def _split(self, slot: int) -> None:
        """Move centroid `slot` next to the cluster of largest error; push the two apart along its spread."""
        stats = self.last
        errors = self._errors(stats)  # of the clusters the statistics were taken over (a new slot has none)
        if slot < len(errors):
            errors[slot] = -1.0
        worst = int(errors.argmax())
        n = max(stats.counts[worst], 1.0)
        spread = np.sqrt(np.maximum(stats.squares[worst] / n - (stats.sums[worst] / n) ** 2, 0.0))
        if not spread.any():
            spread = np.full_like(spread, np.sqrt(self.scale))
        step = (
            0.5 * spread * np.sign(np.arange(len(spread)) % 2 - 0.5)
        )  # alternate signs: a direction, not the diagonal
        centre = self.centroids[worst].copy()
        self.centroids[worst], self.centroids[slot] = centre + step, centre - step
        self.prices[slot] = self.prices[worst]
        self.stage_iterations = 0

    def _balanced_enough(self, stats: ClusterStats) -> bool:
        share = stats.counts.sum() / self.k
        return bool(stats.counts.max() <= (1 + self.balance_slack) * share)

    def _reprice(self, stats: ClusterStats) -> None:
        """A Sinkhorn step on the prices: each moves by softness x log(soft count / share)."""
        if stats.soft is None:
            return  # the statistics of the last Lloyd pass: the next proposal asks for soft counts
        share = stats.counts.sum() / self.k
        self.prices = self.prices + self.softness * np.log(np.maximum(stats.soft, 1e-300) / share)
        self.prices -= self.prices.mean()

    def temperature_estimate(self, stats: ClusterStats) -> float:
        """The mean squared distance of an example to its cluster's mean, under these statistics."""
        return float(self._errors(stats).sum() / max(stats.counts.sum(), 1.0)) or self.scale


def federated_kmeans(parts: list[np.ndarray], k: int, **options) -> FederatedKMeans:
    """Run `FederatedKMeans` with in-process clients, one feature matrix each (in-process runner, tests)."""
    kmeans = FederatedKMeans(k, **options)
    while not kmeans.done:
        stats = [cluster_stats(x, *kmeans.proposal()) for x in parts]
        total = stats[0]
        for s in stats[1:]:
            total = total + s
        kmeans.update(total)
    return kmeans
