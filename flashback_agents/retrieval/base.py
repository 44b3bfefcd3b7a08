"""The retrieval contract: a :class:`Document` and the :class:`Retriever` protocol.

Everything that retrieves (Chroma, BM25, a framework adapter) returns the same ``Document`` so the
FlashBack loop and the integrations never care which backend answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import FlashBackError


class RetrievalError(ValueError, FlashBackError):
    """A retrieval mistake a user can make (missing store, empty corpus, bad file, bad query).

    The message says what went wrong and what to do; a store is never left half-written by it.
    """


@dataclass
class Document:
    """One retrieved chunk: its text, a stable id, a score (higher is better) and metadata.

    ``metadata`` carries at least ``source`` (path), ``start_line`` and ``end_line`` (1-based,
    inclusive) for chunks made by :func:`flashback_agents.retrieval.index_paths`.
    """

    text: str
    id: str
    score: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        return self.metadata.get("source")

    def label(self) -> str | None:
        """Short human label ``file.py:3-9`` used to tag evidence in the context."""
        src = self.metadata.get("source")
        if not src:
            return None
        name = str(src).replace("\\", "/").rsplit("/", 1)[-1]
        start, end = self.metadata.get("start_line"), self.metadata.get("end_line")
        return f"{name}:{start}-{end}" if start is not None and end is not None else name

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "text": self.text, "metadata": dict(self.metadata)}


@runtime_checkable
class Retriever(Protocol):
    """Anything with ``retrieve(query, k) -> list[Document]`` (best first)."""

    def retrieve(self, query: str, k: int = 4) -> list[Document]:
        ...
