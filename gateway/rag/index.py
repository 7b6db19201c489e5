"""What the RAG path keeps and finds: named collections of chunks with their vectors, behind one interface.

Two backends implement ``VectorIndex`` (see ``gateway.rag.backends``): an embedded SQLite file for one
machine, and PostgreSQL with pgvector for several gateways sharing one index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import InvalidRequest, ModelNotFound

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from gateway.rag.chunking import Chunk
    from gateway.rag.documents import Document

COLLECTION_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Source:
    """One retrieved chunk: its text, the file it came from, where in that file, and how well it matched."""

    text: str
    source: str
    location: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape returned to clients beside an answer."""
        return {
            "source": self.source,
            "location": self.location,
            "score": round(self.score, 4),
            "text": self.text,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class CollectionInfo:
    """A collection, the embedding model its vectors come from, and how much it holds."""

    name: str
    model: str
    dimension: int
    sources: int
    chunks: int


class VectorIndex(Protocol):
    """Collections of embedded chunks. Synchronous: the gateway calls it from a worker thread.

    Each write is one transaction. Every method sees what other processes committed before it was called.
    """

    def upsert(
        self, collection: str, document: Document, chunks: Sequence[Chunk], vectors: NDArray[np.float32]
    ) -> None:
        """Replace the chunks of ``document.path`` in ``collection`` (created if new) with ``chunks``."""
        ...

    def search(self, collection: str, vector: NDArray[np.float32], k: int) -> list[Source]:
        """The ``k`` chunks most similar (cosine) to ``vector``, best first; ``ModelNotFound`` if no collection."""
        ...

    def collections(self) -> list[CollectionInfo]:
        """Every collection, by name."""
        ...

    def source_hashes(self, collection: str) -> dict[str, str]:
        """The sha256 of each ingested file of ``collection``, by path; empty if there is no such collection."""
        ...

    def delete_source(self, collection: str, path: str) -> bool:
        """Remove one file's chunks; False if it was not there."""
        ...

    def drop(self, collection: str) -> None:
        """Remove a collection and everything in it; ``ModelNotFound`` if there is none."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def check_collection_name(name: str) -> None:
    """Collection names follow adapter names' rule, so either can appear in a model string."""
    if not COLLECTION_RULE.fullmatch(name):
        raise InvalidRequest(
            f"invalid collection name {name!r}: use 1-64 characters a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit",
            param="collection",
        )


def unknown_collection(name: str, existing: Sequence[str]) -> ModelNotFound:
    """The error for a collection that does not exist, naming those that do."""
    have = ", ".join(sorted(existing)) or "none yet (quiver rag ingest makes one)"
    return ModelNotFound(f"RAG collection '{name}' does not exist; collections: {have}", param="collection")
