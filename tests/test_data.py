import numpy as np
import pytest
import torch

from fedmoe.data import (
    Document,
    balanced_kmeans,
    decode_bytes,
    dirichlet,
    encode_bytes,
    iid,
    kmeans,
    lm_eval_split,
    load_bible_documents,
    load_digits_split,
    shard_sizes,
    split_documents,
    text_features,
)


def assert_partition(shards, n):
    assert all(s.dtype == np.int64 and len(s) > 0 and np.all(np.diff(s) > 0) for s in shards)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(n))


def blobs(sizes, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], dtype=np.float32)
    x = np.concatenate([rng.normal(size=(m, 2)).astype(np.float32) + centers[i] for i, m in enumerate(sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def purity(shards, labels):
    return np.mean([np.bincount(labels[s]).max() / len(s) for s in shards])


def test_digits_split_is_stratified_scaled_and_typed():
    train, test = load_digits_split(test_fraction=0.3, seed=0)
    assert (len(train), len(test)) == (1257, 540)
    assert train.inputs.dtype == torch.float32 and train.inputs.shape == (1257, 64)
    assert train.targets.dtype == torch.int64 and test.targets.shape == (540,)
    assert 0.0 <= train.inputs.min() and train.inputs.max() == 1.0
    train_counts, test_counts = np.bincount(train.targets.numpy()), np.bincount(test.targets.numpy())
    assert np.all(np.abs(test_counts - 0.3 * (train_counts + test_counts)) <= 1)
    again, _ = load_digits_split(test_fraction=0.3, seed=0)
    other, _ = load_digits_split(test_fraction=0.3, seed=1)
    assert torch.equal(train.inputs, again.inputs) and not torch.equal(train.inputs, other.inputs)


def test_bible_chapters_in_canonical_order():
    docs = load_bible_documents()
    assert len(docs) == 1189 and len({d.name for d in docs}) == 1189
    assert docs[0].name == "Genesis 1" and docs[0].text.startswith("In the beginning God created the heaven")
    assert docs[-1].name == "Revelation 22" and docs[-1].text.endswith("be with you all. Amen.")
    assert "  " not in docs[0].text and "Let there be light: and there was light. And God saw" in docs[0].text


def test_split_documents_is_disjoint_and_deterministic():
    docs = load_bible_documents()
    train, test = split_documents(docs, test_every=10)
    assert (len(train), len(test)) == (1071, 118)
    assert test[0] is docs[9] and docs[10] in train
    assert not {d.name for d in train} & {d.name for d in test}
    assert split_documents(docs, test_every=10) == (train, test)


def test_text_features_are_stateless_and_normalised():
    texts = [d.text for d in load_bible_documents()[:20]]
    full = text_features(texts)
    assert full.shape == (20, 1024) and full.dtype == np.float32
    assert np.allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(text_features(texts[5:8]), full[5:8])
    assert not np.allclose(full[0], full[1])


def test_bytes_round_trip():
    t = encode_bytes("Amen ✓")
    assert t.dtype == torch.int64 and len(t) == 8 and int(t.max()) < 256
    assert decode_bytes(t) == "Amen ✓"
    assert decode_bytes(t[:-1]) == "Amen \ufffd"


def test_lm_eval_split_windows_come_from_the_documents():
    docs = [Document(f"d{j}", " ".join(f"w{j}x{i:04d}" for i in range(300))) for j in range(3)]
    docs.append(Document("short", "zzshort"))
    split = lm_eval_split(docs, n=40, length=48, seed=3)
    assert split.inputs.shape == split.targets.shape == (40, 48) and split.inputs.dtype == torch.int64
    assert torch.equal(split.inputs[:, 1:], split.targets[:, :-1])
    for i in range(40):
        window = decode_bytes(split.inputs[i]) + decode_bytes(split.targets[i, -1:])
        assert any(window in d.text for d in docs[:3])
    again = lm_eval_split(docs, n=40, length=48, seed=3)
    assert torch.equal(again.inputs, split.inputs)
    assert not torch.equal(lm_eval_split(docs, n=40, length=48, seed=4).inputs, split.inputs)
    with pytest.raises(ValueError):
        lm_eval_split(docs[-1:], n=4, length=48)


def test_iid_shards_are_balanced_and_seeded():
    shards = iid(103, 5, seed=0)
    assert_partition(shards, 103)
    assert sorted(shard_sizes(shards)) == [20, 20, 21, 21, 21]
    assert all(np.array_equal(a, b) for a, b in zip(shards, iid(103, 5, seed=0)))
    assert not np.array_equal(shards[0], iid(103, 5, seed=1)[0])


def test_dirichlet_skew_follows_alpha():
    labels = np.repeat(np.arange(10), 100)
    skewed = dirichlet(labels, 10, alpha=0.05, seed=0)
    even = dirichlet(labels, 10, alpha=100.0, seed=0)
    for shards in (skewed, even):
        assert_partition(shards, 1000)
    top_two = [np.sort(np.bincount(labels[s], minlength=10))[-2:].sum() / len(s) for s in skewed]
    assert np.median(top_two) > 0.8  # two labels make up most of a typical shard
    assert max(np.bincount(labels[s], minlength=10).max() / len(s) for s in even) < 0.2
    assert_partition(dirichlet(np.arange(12) % 3, 10, alpha=0.01, seed=0), 12)  # no shard left empty


def test_kmeans_recovers_unequal_blobs():
    x, labels = blobs([100, 200, 300, 400])
    clustering = kmeans(x, 4, seed=0)
    assert_partition(clustering.shards, 1000)
    assert sorted(shard_sizes(clustering.shards)) == [100, 200, 300, 400]
    assert purity(clustering.shards, labels) == 1.0
    assert clustering.centroids.dtype == np.float32 and clustering.centroids.shape == (4, 2)
    assert np.allclose(clustering.centroids, [x[s].mean(0) for s in clustering.shards], atol=1e-5)


def test_balanced_kmeans_gives_equal_and_coherent_shards():
    x, labels = blobs([100, 200, 300, 400])
    clustering = balanced_kmeans(x, 4, seed=0)
    assert_partition(clustering.shards, 1000)
    assert shard_sizes(clustering.shards) == [250] * 4
    assert purity(clustering.shards, labels) > purity(iid(1000, 4), labels) + 0.3
    assert np.allclose(clustering.centroids, [x[s].mean(0) for s in clustering.shards], atol=1e-5)
    x, labels = blobs([250] * 4)
    assert purity(balanced_kmeans(x, 4).shards, labels) == 1.0
    uneven = balanced_kmeans(np.random.default_rng(0).normal(size=(103, 3)), 5)
    assert_partition(uneven.shards, 103)
    assert sorted(shard_sizes(uneven.shards)) == [20, 20, 21, 21, 21]


@pytest.mark.parametrize("k", [0, 11])
def test_impossible_shard_counts_raise(k):
    x = np.zeros((10, 2), dtype=np.float32)
    for make in (
        lambda: iid(10, k),
        lambda: dirichlet(np.arange(10), k),
        lambda: kmeans(x, k),
        lambda: balanced_kmeans(x, k),
    ):
        with pytest.raises(ValueError, match="non-empty shards"):
            make()
