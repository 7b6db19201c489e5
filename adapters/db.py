"""The registry's tables (SQLAlchemy Core), engine set-up for SQLite or any SQLAlchemy URL, and ``Database``:
the one engine every registry store (adapters, deployments, keys, usage) works over, with the one write protocol.
The fine-tuning job queue (``jobs``) keeps its own tables and engine on the same database URL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")

metadata = MetaData()

adapters = Table(
    "adapters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The highest number ever given: numbers are never reused after a delete, because a replica may
    # still hold the deleted name@vN loaded under that name.
    Column("last_number", Integer, nullable=False),
    # The tenant whose keys see and use the adapter; NULL: shared with every tenant.
    Column("tenant", String(64), nullable=True),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("adapter_name", String(64), ForeignKey("adapters.name", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    # Relative to the store root, so the store can be mounted at another path on another machine.
    Column("path", String(512), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("target_modules", JSON, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("manifest", JSON, nullable=True),
    UniqueConstraint("adapter_name", "number", name="uq_versions_adapter_number"),
    UniqueConstraint("adapter_name", "sha256", name="uq_versions_adapter_sha256"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("adapter_name", String(64), primary_key=True),
    Column("alias", String(32), primary_key=True),
    Column("version_number", Integer, nullable=False),
    # No cascade: the database itself refuses to delete a version an alias points at.
    ForeignKeyConstraint(
        ["adapter_name", "version_number"],
        ["versions.adapter_name", "versions.number"],
        name="fk_aliases_version",
    ),
)

# Eval reports (``quiver eval``), kept for each version; the newest one is what promotion reads.
evaluations = Table(
    "evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("adapter_name", String(64), nullable=False),
    Column("version_number", Integer, nullable=False),
    Column("report", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["adapter_name", "version_number"],
        ["versions.adapter_name", "versions.number"],
        name="fk_evaluations_version",
        ondelete="CASCADE",
    ),
)

# How the gateway routes to an adapter: the description and example prompts ``model="auto"`` matches
# against, and the fallback chain tried when the adapter cannot answer. A table of its own, so databases
# made before it existed gain it from ``create_all``.
routing = Table(
    "adapter_routing",
    metadata,
    Column("adapter_name", String(64), ForeignKey("adapters.name", ondelete="CASCADE"), primary_key=True),
    Column("description", Text, nullable=True),
    Column("examples", JSON, nullable=False),
    # NULL: the gateway's default chain; [] : no fallback at all.
    Column("fallback", JSON, nullable=True),
)

# Merged models (``quiver merge``) of each version, with their equivalence reports; the newest one counts.
merges = Table(
    "merges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("adapter_name", String(64), nullable=False),
    Column("version_number", Integer, nullable=False),
    # Absolute: a merged model lives wherever `quiver merge --output` put it (a shared volume on a cluster).
    Column("path", String(1024), nullable=False),
    Column("report", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["adapter_name", "version_number"],
        ["versions.adapter_name", "versions.number"],
        name="fk_merges_version",
        ondelete="CASCADE",
    ),
)

# Versions served by a dedicated server of their own (a merged model, LoRA off); at most one per version.
deployments = Table(
    "deployments",
    metadata,
    Column("adapter_name", String(64), primary_key=True),
    Column("version_number", Integer, primary_key=True),
    Column("url", String(1024), nullable=False),
    Column("served_model", String(256), nullable=False),
    # The server's process when `quiver deploy merged` started it on this machine; None when registered by URL.
    Column("pid", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # No cascade: the database itself refuses to delete a version that is deployed.
    ForeignKeyConstraint(
        ["adapter_name", "version_number"],
        ["versions.adapter_name", "versions.number"],
        name="fk_deployments_version",
    ),
)

# Tenants and their limits (None: unlimited). A tenant row is made with its first key.
tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("requests_per_min", Integer, nullable=True),
    Column("tokens_per_min", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# API keys: only the secret's SHA-256 is kept; the key itself is shown once, at creation.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("tenant", String(64), ForeignKey("tenants.name"), nullable=False),
    Column("name", String(128), nullable=True),
    Column("scopes", JSON, nullable=False),
    Column("requests_per_min", Integer, nullable=True),
    Column("tokens_per_min", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# Usage per minute, key, tenant and what served the request (``name@vN``, the base, a frontier model).
# Not a registry change: written without bumping the revision.
usage = Table(
    "usage",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("tenant", String(64), primary_key=True),
    Column("key_id", String(32), primary_key=True),  # "" for requests made while the gateway is open
    Column("served_by", String(256), primary_key=True),
    Column("requests", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
)

# One row; every write transaction bumps it first, which also serializes writers.
revision = Table(
    "revision",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", BigInteger, nullable=False),
)

WRITE = "quiver_write"  # execution option marking a connection that will write

# The schema before migrations existed (revision 0001); older databases may lack some of these tables.
BASELINE = "0001"
# The newest migration in adapters/migrations/versions (a unit test holds the two together). A database already
# there is opened without loading Alembic and its scripts: a gateway's cold start does not pay for migrations.
HEAD = "0002"
BASELINE_TABLES = (
    "adapters",
    "versions",
    "aliases",
    "evaluations",
    "adapter_routing",
    "merges",
    "deployments",
    "revision",
)
_MIGRATION_LOCK = 0x51_7569_7665  # any constant shared by every gateway: "Quive"
# Writers are serialized by the revision row, so a collision means a writer outside that protocol;
# a few retries are plenty.
_WRITE_ATTEMPTS = 5


class Database:
    """The registry's database: one engine, shared by every store over it.

    Every change goes through ``write``, which bumps the revision first, so gateways polling the revision
    see it and writers take turns; only what is no registry change (usage counts) uses ``write_unversioned``.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})

    @classmethod
    def open(cls, url: str) -> Database:
        """The database at ``url``, created or migrated to the newest schema (see ``open_engine``)."""
        return cls(open_engine(url))

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def read(self) -> AbstractContextManager[Connection]:
        """A read transaction."""
        return self.engine.begin()

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a write transaction that bumps the revision; retry on unique-key collisions."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self._writer.begin() as conn:
                    # First statement: on PostgreSQL the row lock makes writers take turns.
                    conn.execute(update(revision).where(revision.c.id == 1).values(value=revision.c.value + 1))
                    return work(conn)
            except IntegrityError:
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def write_unversioned(self) -> AbstractContextManager[Connection]:
        """A write transaction that leaves the revision alone: for what gateways need not reload."""
        return self._writer.begin()

    def revision(self, conn: Connection) -> int:
        """The revision counter as ``conn``'s transaction sees it: bumped by every change."""
        return int(conn.scalar(select(revision.c.value).where(revision.c.id == 1)) or 0)


def utc(value: datetime) -> datetime:
    """A stored time in UTC: SQLite hands back naive datetimes (we stored UTC), PostgreSQL aware ones in the
    session's zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sql_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout and real transactions.

    Connections opened with the ``WRITE`` execution option take SQLite's write lock when they begin.
    """
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def open_engine(url: str) -> Engine:
    """An engine for ``url`` (see ``sql_engine``) with the registry's schema migrated to the newest revision."""
    engine = sql_engine(url)
    migrate(engine)
    try:
        # A writer from the start: upgrading a read transaction to a write one can fail at once on SQLite.
        with engine.execution_options(**{WRITE: True}).begin() as conn:
            if conn.scalar(select(revision.c.value).where(revision.c.id == 1)) is None:
                conn.execute(insert(revision).values(id=1, value=0))
    except IntegrityError:
        pass  # another process opened the same database first
    return engine


def upsert(conn: Connection, table: Table) -> Any:
    """An INSERT of ``table`` that can say ``on_conflict_do_update``: SQLite's or PostgreSQL's."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the registry runs on SQLite or PostgreSQL, not {conn.dialect.name}")


def _alembic(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = conn
    return config


def _stamped(conn: Connection) -> str | None:
    """The Alembic revision recorded in the database; None before it was ever migrated."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    stamped = conn.scalar(text("SELECT version_num FROM alembic_version"))
    return None if stamped is None else str(stamped)


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at; None before it was ever migrated."""
    with engine.connect() as conn:
        return _stamped(conn)


def migrate(engine: Engine) -> None:
    """Bring the registry's schema to the newest revision; safe when several processes start at once.

    A new database gets every table at once and is stamped with the newest revision. One made before
    migrations existed (tables, no ``alembic_version``) is stamped with the baseline and upgraded.
    """
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            # Gateways starting together: one migrates, the others wait and then find nothing to do.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        current = _stamped(conn)
        if current == HEAD:
            return
        from alembic import command

        config = _alembic(conn)
        if current is None:
            if inspect(conn).has_table("adapters"):
                metadata.create_all(conn, tables=[metadata.tables[name] for name in BASELINE_TABLES])
                command.stamp(config, BASELINE)
            else:
                metadata.create_all(conn)
                command.stamp(config, "head")
                return
        command.upgrade(config, "head")


def _wal(cursor: Any) -> None:
    """Switch the database to WAL (it stays so); the switch ignores busy_timeout, so wait out a racing opener."""
    for attempt in range(100):
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.05)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it skips it before SELECT) and emit our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 30000")
        if engine.url.database not in (None, "", ":memory:"):
            _wal(cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # A writer takes the write lock up front; upgrading a read snapshot later can fail with
        # SQLITE_BUSY without waiting, when another writer committed in between.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")
