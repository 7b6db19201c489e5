"""The RAG index's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL but for the vector column.

A collection's ``revision`` goes up with every write to it, so a reader holding a copy of its vectors
knows when to read them again; ids are never reused, so a dropped and re-created collection cannot
pass for the old one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.types import TypeEngine, UserDefinedType

metadata = MetaData()


class PgVector(UserDefinedType[NDArray[np.float32]]):
    """pgvector's ``vector`` type, of any dimension, sent as its text form ``[x,y,...]``."""

    cache_ok = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "vector"

    def bind_processor(self, dialect: Dialect) -> Any:
        def process(value: NDArray[np.float32] | None) -> str | None:
            if value is None:
                return None
            return "[" + ",".join(f"{x:.8g}" for x in value.tolist()) + "]"

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        def process(value: str | None) -> NDArray[np.float32] | None:
            return None if value is None else np.array(value.strip("[]").split(","), dtype=np.float32)

        return process


class Vector(TypeDecorator[NDArray[np.float32]]):
    """A float32 vector: pgvector's type on PostgreSQL, raw little-endian float32 bytes elsewhere."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(PgVector())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: NDArray[np.float32] | None, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return np.ascontiguousarray(value, dtype="<f4").tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> NDArray[np.float32] | None:
        if value is None or dialect.name == "postgresql":
            return value  # type: ignore[no-any-return]
        return np.frombuffer(value, dtype="<f4")


collections = Table(
    "rag_collections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("model", String(128), nullable=False),
    Column("dimension", Integer, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

sources = Table(
    "rag_sources",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("collection_id", Integer, ForeignKey("rag_collections.id", ondelete="CASCADE"), nullable=False),
    # The absolute path the file was read from: the key that a re-ingest replaces.
    Column("path", Text, nullable=False),
    Column("name", String(255), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("ingested_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("collection_id", "path", name="uq_rag_sources_collection_path"),
    sqlite_autoincrement=True,
)

chunks = Table(
    "rag_chunks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_id", Integer, ForeignKey("rag_sources.id", ondelete="CASCADE"), nullable=False),
    # Denormalized from the source, so a search filters one table.
    Column("collection_id", Integer, ForeignKey("rag_collections.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("location", Text, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("vector", Vector, nullable=False),
    Index("ix_rag_chunks_collection", "collection_id"),
    Index("ix_rag_chunks_source", "source_id"),
)
