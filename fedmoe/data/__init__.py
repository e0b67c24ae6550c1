"""Data sets, featurizers and partitioners of training units into shards."""

from fedmoe.data.bible import (
    decode_bytes,
    encode_bytes,
    lm_eval_split,
    load_bible_documents,
    split_documents,
    text_features,
)
from fedmoe.data.digits import load_digits_split
from fedmoe.data.partition import (
    Clustering,
    balanced_kmeans,
    client_parts,
    dirichlet,
    iid,
    kmeans,
    nearest,
    shard_sizes,
)
from fedmoe.data.types import Document

__all__ = [
    "Clustering",
    "Document",
    "balanced_kmeans",
    "client_parts",
    "decode_bytes",
    "dirichlet",
    "encode_bytes",
    "iid",
    "kmeans",
    "lm_eval_split",
    "load_bible_documents",
    "load_digits_split",
    "nearest",
    "shard_sizes",
    "split_documents",
    "text_features",
]
