"""Plain data containers of the loaders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """A named text (one Bible chapter)."""

    name: str
    text: str
