"""Federated k-means: Lloyd on sums and counts, the same whatever the split, as good as central k-means."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from fedmoe.clustering import (
    ClusterStats,
    FederatedKMeans,
    cluster_stats,
    federated_kmeans,
    from_upper_triangles,
    histogram,
    nearest,
    upper_triangles,
)
from fedmoe.data import load_digits_split

DIGITS = load_digits_split()[0].inputs.numpy().astype(np.float64)


def unequal_parts(x: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Five clients holding unequal, non-random parts of x (sorted by the first principal-ish direction)."""
    order = np.argsort(x @ np.random.default_rng(seed).normal(size=x.shape[1]))
    return np.split(x[order], [100, 250, 700, 1000])


@pytest.mark.parametrize("k", [2, 4, 8])
def test_federated_centroids_equal_central_kmeans_from_the_same_seeding(k: int) -> None:
    federated = federated_kmeans(unequal_parts(DIGITS), k)
    central = KMeans(k, init=federated.centroids, n_init=1, tol=1e-6).fit(DIGITS)
    assert np.allclose(central.cluster_centers_, federated.centroids, atol=1e-6)
    one_client = federated_kmeans([DIGITS], k)
    assert np.allclose(one_client.centroids, federated.centroids, atol=1e-9)  # the split does not matter


def test_the_seeding_is_as_good_as_kmeans_plus_plus() -> None:
    federated = federated_kmeans(unequal_parts(DIGITS), 4)
    inertia = ((DIGITS - federated.centroids[nearest(DIGITS, federated.centroids)]) ** 2).sum()
    reference = KMeans(4, n_init=10, random_state=0).fit(DIGITS).inertia_
    assert inertia <= 1.03 * reference, (inertia, reference)
    # the temperature is the mean squared distance to a centroid
    assert federated.temperature == pytest.approx(inertia / len(DIGITS), rel=1e-6)


def test_balanced_kmeans_balances_over_the_federations_counts() -> None:
    plain = federated_kmeans(unequal_parts(DIGITS), 4)
    balanced = federated_kmeans(unequal_parts(DIGITS), 4, balanced=True)
    share = len(DIGITS) / 4
    assert np.bincount(nearest(DIGITS, plain.centroids), minlength=4).max() > 1.2 * share
    sizes = np.bincount(nearest(DIGITS, balanced.centroids, balanced.prices), minlength=4)
    assert sizes.max() <= 1.1 * share and sizes.min() >= 0.9 * share, sizes
    assert np.allclose(balanced.centroids, plain.centroids)  # balance moves prices, not centroids


def test_client_statistics_add_up_and_say_only_aggregates() -> None:
    centroids = DIGITS[:3]
    parts = unequal_parts(DIGITS)
    total = cluster_stats(parts[0], centroids)
    for part in parts[1:]:
        total = total + cluster_stats(part, centroids)
    whole = cluster_stats(DIGITS, centroids)
    assert np.allclose(total.counts, whole.counts) and np.allclose(total.sums, whole.sums)
    assert total.counts.shape == (3,) and total.sums.shape == total.squares.shape == (3, 64)
    assert histogram(DIGITS, centroids).tolist() == whole.counts.astype(int).tolist()
    one = cluster_stats(DIGITS, None)  # the first proposal: everything in one cluster
    assert one.counts.tolist() == [len(DIGITS)] and np.allclose(one.sums[0], DIGITS.sum(0))


def test_bad_statistics_are_refused() -> None:
    kmeans = FederatedKMeans(2)
    kmeans.update(cluster_stats(DIGITS, None))
    good = cluster_stats(DIGITS, kmeans.proposal()[0])
    for bad in (
        ClusterStats(good.counts[:1], good.sums[:1], good.squares[:1]),
        ClusterStats(good.counts, good.sums * np.nan, good.squares),
        ClusterStats(-good.counts, good.sums, good.squares),
    ):
        with pytest.raises(ValueError):
            kmeans.update(bad)
    kmeans.update(good)  # a refused update changed nothing
    assert kmeans.iterations == 2


def test_second_moments_are_gathered_in_one_more_pass_and_give_each_clusters_covariance() -> None:
    parts = unequal_parts(DIGITS[:, :24])  # 24 features: 4 x 300 upper-triangle numbers per client
    plain = federated_kmeans(parts, 4)
    kmeans = federated_kmeans(parts, 4, second_moments=True)
    assert kmeans.iterations == plain.iterations + 1 and np.allclose(kmeans.centroids, plain.centroids)
    counts, means, covariances = kmeans.last.moments()
    labels = nearest(DIGITS[:, :24], kmeans.centroids)
    for c in range(4):
        mine = DIGITS[labels == c, :24]
        assert counts[c] == len(mine) and np.allclose(means[c], mine.mean(0))
        assert np.allclose(covariances[c], np.cov(mine.T, bias=True), atol=1e-8)
    restored = FederatedKMeans(4)
    restored.restore(kmeans.state())
    assert np.array_equal(restored.last.products, kmeans.last.products)
    flat = upper_triangles(kmeans.last.products)
    assert flat.shape == (4 * 24 * 25 // 2,)
    assert np.array_equal(from_upper_triangles(flat, 4, 24), kmeans.last.products)
    with pytest.raises(ValueError, match="values"):
        from_upper_triangles(flat[:-1], 4, 24)
    # moments that disagree with the sums of squares, and a pass that asked for moments without them
    asked = FederatedKMeans(2, second_moments=True)
    while not asked.gathering:
        asked.update(cluster_stats(DIGITS, *asked.proposal()[:3]))
    good = cluster_stats(DIGITS, *asked.proposal())
    with pytest.raises(ValueError, match="disagree"):
        asked.update(ClusterStats(good.counts, good.sums, good.squares, None, good.products * 1.01))
    with pytest.raises(ValueError, match="second moments"):
        asked.update(cluster_stats(DIGITS, *asked.proposal()[:3]))
    assert asked.update(good) and asked.done


def test_second_moments_too_many_to_send_are_not_asked_for() -> None:
    kmeans = federated_kmeans([DIGITS], 32, second_moments=True)  # 32 x 64 x 65 / 2 > 65,536 numbers
    assert kmeans.done and kmeans.last.products is None
    assert kmeans.last.moments()[2].shape == (32, 64, 64)  # diagonal covariances from the squares
