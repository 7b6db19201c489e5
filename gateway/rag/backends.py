"""The two ``VectorIndex`` backends, sharing tables and writes, differing in how they search.

- ``EmbeddedIndex`` (the default, ``sqlite:///DATA_DIR/rag.db``): vectors as float32 blobs in SQLite (WAL, one
  transaction per write); a search multiplies the query by an in-memory copy of the collection's
  vectors, exact cosine. The copy is read again when the collection's revision changes, so a gateway
  sees what ``quiver rag ingest`` wrote in another process at its next search.
- ``PgVectorIndex`` (``postgresql+psycopg2://...``): the same tables in PostgreSQL, vectors as pgvector's
  ``vector``; the server searches (exact cosine, ``<=>``), so every gateway sharing it is always current.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, Engine, Float, bindparam, delete, func, insert, make_url, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from adapters.db import WRITE, sql_engine
from core.embeddings import MODEL_NAME, nearest
from core.errors import InvalidRequest, QuiverError
from gateway.rag import tables
from gateway.rag.index import CollectionInfo, Source, check_collection_name, unknown_collection

if TYPE_CHECKING:
    from gateway.rag.chunking import Chunk
    from gateway.rag.documents import Document
    from gateway.rag.index import VectorIndex
    from gateway.settings import Settings

T = TypeVar("T")

# Writers to one collection take turns on its row; a collision means two created it at once. Retry.
_WRITE_ATTEMPTS = 5


def index_url(settings: Settings) -> str:
    """``QUIVER_RAG_URL``, or the embedded index's SQLite file in the data dir."""
    return settings.rag_url or f"sqlite:///{settings.data_dir / 'rag.db'}"


def open_index(url: str, model: str = MODEL_NAME) -> VectorIndex:
    """The index at ``url`` (created if new) for vectors of the embedding model ``model``."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return EmbeddedIndex.open(url, model)
    if backend == "postgresql":
        return PgVectorIndex.open(url, model)
    raise QuiverError(f"QUIVER_RAG_URL must be a sqlite:/// or postgresql+psycopg2:// URL, got a {backend} URL")


class SqlIndex:
    """Tables and writes both backends share; a subclass supplies ``search``."""

    def __init__(self, engine: Engine, model: str) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self.model = model

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    def upsert(
        self, collection: str, document: Document, chunks: Sequence[Chunk], vectors: NDArray[np.float32]
    ) -> None:
        """Replace the chunks of ``document.path`` in ``collection`` (created if new), in one transaction."""
        check_collection_name(collection)
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        dimension = int(vectors.shape[1]) if vectors.ndim == 2 else 0

        def work(conn: Connection) -> None:
            collection_id = self._claim(conn, collection, dimension)
            self._delete_source(conn, collection_id, document.path)
            s = tables.sources
            source = {"collection_id": collection_id, "path": document.path, "name": document.name,
                      "sha256": document.sha256, "chunks": len(chunks), "ingested_at": datetime.now(UTC)}  # fmt: skip
            source_id = conn.execute(insert(s).values(**source).returning(s.c.id)).scalar_one()
            if chunks:
                rows = [
                    {
                        "source_id": source_id,
                        "collection_id": collection_id,
                        "position": position,
                        "text": chunk.text,
                        "location": chunk.location,
                        "metadata": dict(chunk.metadata),
                        "vector": vector,
                    }  # fmt: skip
                    for position, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))
                ]
                conn.execute(insert(tables.chunks), rows)

        self._write(work)

    def collections(self) -> list[CollectionInfo]:
        """Every collection with its source and chunk counts, by name."""
        c, s = tables.collections, tables.sources
        chunk_count = func.coalesce(func.sum(s.c.chunks), 0)
        query = (
            select(c.c.name, c.c.model, c.c.dimension, func.count(s.c.id), chunk_count)
            .select_from(c.outerjoin(s, s.c.collection_id == c.c.id))
            .group_by(c.c.id)
            .order_by(c.c.name)
        )
        with self._engine.connect() as conn:
            return [CollectionInfo(*row) for row in conn.execute(query)]

    def source_hashes(self, collection: str) -> dict[str, str]:
        """The sha256 of each ingested file, by path; empty if there is no such collection."""
        c, s = tables.collections, tables.sources
        query = select(s.c.path, s.c.sha256).join(c, c.c.id == s.c.collection_id).where(c.c.name == collection)
        with self._engine.connect() as conn:
            return {path: sha for path, sha in conn.execute(query)}

    def delete_source(self, collection: str, path: str) -> bool:
        """Remove one file's chunks; False if it was not in the collection."""

        def work(conn: Connection) -> bool:
            collection_id = self._bump(conn, collection)
            return collection_id is not None and self._delete_source(conn, collection_id, path)

        return self._write(work)

    def drop(self, collection: str) -> None:
        """Remove a collection and everything in it."""

        def work(conn: Connection) -> None:
            collection_id = self._bump(conn, collection)
            if collection_id is None:
                raise self._unknown(conn, collection)
            conn.execute(delete(tables.chunks).where(tables.chunks.c.collection_id == collection_id))
            conn.execute(delete(tables.sources).where(tables.sources.c.collection_id == collection_id))
            conn.execute(delete(tables.collections).where(tables.collections.c.id == collection_id))

        self._write(work)

    # -- internals ------------------------------------------------------------------------------

    def _write(self, work: Callable[[Connection], T]) -> T:
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self._writer.begin() as conn:
                    return work(conn)
            except IntegrityError:
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _bump(self, conn: Connection, collection: str) -> int | None:
        """Raise the collection's revision (on PostgreSQL this locks its row until commit); its id, or None."""
        c = tables.collections
        bumped = conn.execute(
            update(c).where(c.c.name == collection).values(revision=c.c.revision + 1).returning(c.c.id)
        )
        row = bumped.first()
        return None if row is None else int(row[0])

    def _claim(self, conn: Connection, collection: str, dimension: int) -> int:
        """The id of ``collection``, created if new, with its revision raised; refuses another model's vectors."""
        c = tables.collections
        collection_id = self._bump(conn, collection)
        if collection_id is None:
            values = {"name": collection, "model": self.model, "dimension": dimension, "revision": 1,
                      "created_at": datetime.now(UTC)}  # fmt: skip
            return int(conn.execute(insert(c).values(**values).returning(c.c.id)).scalar_one())
        model, have = conn.execute(select(c.c.model, c.c.dimension).where(c.c.id == collection_id)).one()
        if have == 0 and dimension:  # created by a file that had no chunks
            conn.execute(update(c).where(c.c.id == collection_id).values(dimension=dimension))
        elif model != self.model or (dimension and dimension != have):
            raise InvalidRequest(
                f"collection '{collection}' holds {model} vectors ({have} dimensions); these are {self.model} "
                f"({dimension}): ingest into another collection, or `quiver rag rm` this one first",
                param="collection",
            )
        return collection_id

    def _delete_source(self, conn: Connection, collection_id: int, path: str) -> bool:
        s = tables.sources
        where = (s.c.collection_id == collection_id) & (s.c.path == path)
        source_id = conn.scalar(select(s.c.id).where(where))
        if source_id is None:
            return False
        conn.execute(delete(tables.chunks).where(tables.chunks.c.source_id == source_id))
        conn.execute(delete(s).where(s.c.id == source_id))
        return True

    def _collection(self, conn: Connection, collection: str, vector: NDArray[np.float32]) -> tuple[int, int]:
        """The id and revision of the collection a search asks for; refuses a query of the wrong length."""
        c = tables.collections
        row = conn.execute(select(c.c.id, c.c.revision, c.c.dimension).where(c.c.name == collection)).first()
        if row is None:
            raise self._unknown(conn, collection)
        if row.dimension and row.dimension != vector.shape[0]:
            raise InvalidRequest(
                f"collection '{collection}' has {row.dimension}-dimensional vectors, not {vector.shape[0]}"
            )
        return int(row.id), int(row.revision)

    def _unknown(self, conn: Connection, collection: str) -> QuiverError:
        return unknown_collection(collection, list(conn.scalars(select(tables.collections.c.name))))

    def _sources(self, conn: Connection, ids: Sequence[int], scores: Sequence[float]) -> list[Source]:
        """The chunks ``ids`` as ``Source``s with ``scores``, in the order given."""
        k, s = tables.chunks, tables.sources
        query = select(k.c.id, k.c.text, k.c.location, k.c.metadata, s.c.name).join(s, s.c.id == k.c.source_id)
        rows = {row.id: row for row in conn.execute(query.where(k.c.id.in_(ids)))}
        return [
            Source(rows[i].text, rows[i].name, rows[i].location, float(score), rows[i].metadata)
            for i, score in zip(ids, scores, strict=True)
            if i in rows
        ]


@dataclass(frozen=True)
class _Vectors:
    """A collection's vectors as of one revision, row ``n`` being chunk ``ids[n]``."""

    collection_id: int
    revision: int
    ids: NDArray[np.int64]
    matrix: NDArray[np.float32]


class EmbeddedIndex(SqlIndex):
    """A SQLite file; searches run in this process over a cached copy of each collection's vectors."""

    def __init__(self, engine: Engine, model: str) -> None:
        super().__init__(engine, model)
        self._cache: dict[str, _Vectors] = {}
        self._loading = threading.Lock()

    @classmethod
    def open(cls, url: str, model: str = MODEL_NAME) -> EmbeddedIndex:
        """Open (creating if needed) the SQLite index at ``url``."""
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sql_engine(url)
        tables.metadata.create_all(engine)
        return cls(engine, model)

    def search(self, collection: str, vector: NDArray[np.float32], k: int) -> list[Source]:
        """The ``k`` nearest chunks by cosine similarity, exact, best first."""
        # One read transaction: the revision, the vectors and the chunk rows all come from one snapshot.
        with self._engine.connect() as conn:
            collection_id, revision = self._collection(conn, collection, vector)
            vectors = self._vectors(conn, collection, collection_id, revision)
            if k <= 0 or not len(vectors.ids):
                return []
            top = nearest(vector[np.newaxis, :], vectors.matrix, k)[0]
            scores = vectors.matrix[top] @ vector
            return self._sources(conn, vectors.ids[top].tolist(), scores.tolist())

    def _vectors(self, conn: Connection, collection: str, collection_id: int, revision: int) -> _Vectors:
        cached = self._cache.get(collection)
        if cached is not None and (cached.collection_id, cached.revision) == (collection_id, revision):
            return cached
        # Concurrent searches after a write would each read the whole collection; let one do it.
        with self._loading:
            cached = self._cache.get(collection)
            if cached is not None and (cached.collection_id, cached.revision) == (collection_id, revision):
                return cached
            k = tables.chunks
            rows = conn.execute(select(k.c.id, k.c.vector).where(k.c.collection_id == collection_id).order_by(k.c.id))
            ids, vectors = [], []
            for chunk_id, vector in rows:
                ids.append(chunk_id)
                vectors.append(vector)
            matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
            loaded = _Vectors(collection_id, revision, np.asarray(ids, dtype=np.int64), matrix)
            self._cache[collection] = loaded
            return loaded


class PgVectorIndex(SqlIndex):
    """PostgreSQL with the pgvector extension; the server searches, so several gateways can share it."""

    @classmethod
    def open(cls, url: str, model: str = MODEL_NAME) -> PgVectorIndex:
        """Connect, enable pgvector (``CREATE EXTENSION``) if it is not yet, and create the tables."""
        engine = sql_engine(url)
        try:
            _enable_pgvector(engine)
            tables.metadata.create_all(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, model)

    def search(self, collection: str, vector: NDArray[np.float32], k: int) -> list[Source]:
        """The ``k`` nearest chunks by cosine distance, exact (a scan of the collection's rows), best first."""
        kc = tables.chunks
        distance = kc.c.vector.op("<=>", return_type=Float())(bindparam("query", vector, type_=tables.Vector()))
        with self._engine.connect() as conn:
            collection_id, _ = self._collection(conn, collection, vector)
            if k <= 0:
                return []
            query = select(kc.c.id, distance).where(kc.c.collection_id == collection_id).order_by(distance).limit(k)
            found = conn.execute(query).all()
            return self._sources(conn, [row[0] for row in found], [1.0 - row[1] for row in found])


def _enable_pgvector(engine: Engine) -> None:
    for attempt in range(2):
        try:
            with engine.begin() as conn:
                if conn.scalar(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")):
                    return
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
                return
        except IntegrityError:
            if attempt:  # two processes created it at once; the second look finds it
                raise
        except DBAPIError as exc:
            where = engine.url.render_as_string(hide_password=True)
            detail: Any = getattr(exc.orig, "pgerror", None) or exc.orig
            raise QuiverError(
                f"the RAG index at {where} needs the pgvector extension, which this server lacks or this user "
                f"may not create ({str(detail).strip()}); install it (Debian: postgresql-NN-pgvector) and run "
                "CREATE EXTENSION vector as a superuser"
            ) from None
