"""Ingestion: read files, chunk them, embed the chunks, and write each file's chunks in one transaction.

Every file is read and checked before anything is written, so a malformed JSONL line costs no partial
ingest. A file whose content hash is already in the collection under the same path is skipped; a
changed one replaces its earlier chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.embeddings import Embedder
from core.errors import InvalidRequest
from gateway.rag.chunking import Chunk, ChunkingConfig, chunk_document
from gateway.rag.documents import Document, read_document
from gateway.rag.index import VectorIndex, check_collection_name

# Chunks embedded between two progress reports (and held in memory at once beyond one file's).
_BATCH = 64

# Called with (chunks embedded so far, chunks to embed in all) after each batch.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IngestedFile:
    """What an ingest did with one file: ``chunks`` written, or ``unchanged`` (already there as it is)."""

    path: str
    name: str
    chunks: int
    unchanged: bool


def ingest(
    index: VectorIndex,
    embedder: Embedder,
    collection: str,
    paths: Sequence[Path],
    config: ChunkingConfig = ChunkingConfig(),  # noqa: B008 - frozen, so one shared default is safe
    progress: Progress | None = None,
) -> list[IngestedFile]:
    """Ingest ``paths`` into ``collection`` (created if new); one result per distinct file, in order."""
    check_collection_name(collection)
    if config.chunk_tokens > embedder.max_tokens:
        raise InvalidRequest(
            f"chunks of {config.chunk_tokens} tokens are longer than {embedder.name} reads "
            f"({embedder.max_tokens}); the rest would not be embedded",
            param="chunk_tokens",
        )
    documents = _read_all(paths)
    stored = index.source_hashes(collection)
    pending: list[tuple[Document, list[Chunk]]] = []
    results: dict[str, IngestedFile] = {}
    for document in documents:
        if stored.get(document.path) == document.sha256:
            results[document.path] = IngestedFile(document.path, document.name, 0, unchanged=True)
        else:
            pending.append((document, chunk_document(document, embedder.token_spans, config)))
    total = sum(len(chunks) for _, chunks in pending)
    done = 0
    for document, chunks in pending:
        parts = []
        for start in range(0, len(chunks), _BATCH):
            parts.append(embedder.encode([c.embedding_text for c in chunks[start : start + _BATCH]]))
            done += len(parts[-1])
            if progress is not None:
                progress(done, total)
        vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dimension), dtype=np.float32)
        index.upsert(collection, document, chunks, vectors)
        results[document.path] = IngestedFile(document.path, document.name, len(chunks), unchanged=False)
    return [results[d.path] for d in documents]


def _read_all(paths: Sequence[Path]) -> list[Document]:
    """Each distinct file once, in the order first named."""
    documents: dict[str, Document] = {}
    for path in paths:
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a file", param="files")
        document = read_document(path)
        documents.setdefault(document.path, document)
    return list(documents.values())
