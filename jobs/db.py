"""The fine-tuning tables (SQLAlchemy Core): uploaded files, jobs, their events and checkpoints.

They live in the registry's database, beside its tables, and are only ever added: ``create_all``
creates missing tables in an existing database but never alters one. Times are Unix seconds, as the
OpenAI API shows them; ``seq`` orders rows for cursor pagination (``after=<id>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.schema import SchemaItem

from adapters import db as registry_db
from core.errors import NotFound

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

metadata = MetaData()

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")

# A job's status moves validating_files -> queued -> running -> succeeded | failed | cancelled.
ACTIVE_STATUSES = ("validating_files", "queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


def _listed(name: str, *items: SchemaItem) -> Table:
    """A table ``page`` lists: ``seq`` orders its rows, and ``id`` is what clients (and cursors) call a row."""
    return Table(
        name,
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(40), nullable=False, unique=True),
        *items,
    )


def _job_id() -> Column[str]:
    """The job a row belongs to (events, checkpoints)."""
    return Column("job_id", String(40), ForeignKey("fine_tuning_jobs.id"), nullable=False, index=True)


files = _listed(
    "files",
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    # Relative to the files directory, so the data dir can be mounted elsewhere.
    Column("path", String(512), nullable=False),
    # What the training-data loader found (``trainingdata.formats.DataFormat``), for checking a job's method.
    Column("format", String(32), nullable=True),
    Column("examples", Integer, nullable=True),
    Column("created_at", BigInteger, nullable=False),
)

jobs = _listed(
    "fine_tuning_jobs",
    Column("model", String(256), nullable=False),
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40), nullable=True),
    Column("method", String(16), nullable=False),
    Column("hyperparameters", JSON, nullable=False),
    Column("suffix", String(64), nullable=True),
    Column("seed", BigInteger, nullable=False),
    # The adapter name a success is pushed under; fixed at creation so a cancel can find what was pushed.
    Column("output_model", String(64), nullable=False),
    Column("user_metadata", JSON, nullable=True),
    Column("status", String(24), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    Column("fine_tuned_model", String(64), nullable=True),
    Column("trained_tokens", BigInteger, nullable=True),
    Column("error", JSON, nullable=True),
    Column("result_files", JSON, nullable=False),
    Column("train_examples", Integer, nullable=True),
    # ``host:pid`` of the worker running it, and when that worker last said it was alive.
    Column("worker", String(255), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
)

events = _listed(
    "fine_tuning_events",
    _job_id(),
    Column("created_at", BigInteger, nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=True),
)

checkpoints = _listed(
    "fine_tuning_checkpoints",
    _job_id(),
    Column("step_number", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("fine_tuned_model_checkpoint", String(128), nullable=False),
    Column("metrics", JSON, nullable=False),
    UniqueConstraint("job_id", "step_number", name="uq_checkpoints_job_step"),
)

WRITE = registry_db.WRITE


def open_engine(url: str) -> Engine:
    """An engine on the registry's database (same SQLite set-up) with the fine-tuning tables created."""
    engine = registry_db.open_engine(url)
    metadata.create_all(engine)
    return engine


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, newest first unless asked otherwise, and whether more follow."""

    items: tuple[T, ...]
    has_more: bool


def page(
    conn: Connection,
    table: Table,
    where: ColumnElement[bool] | None,
    *,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> tuple[Sequence[RowMapping], bool]:
    """Up to ``limit`` rows after the row whose id is ``after``, in ``seq`` order, and whether more follow."""
    query = select(table)
    if where is not None:
        query = query.where(where)
    if after is not None:
        # The cursor must be a row of this listing: one from another job's events would page through nonsense.
        cursor = conn.scalar(query.with_only_columns(table.c.seq).where(table.c.id == after))
        if cursor is None:
            raise NotFound(f"'after' names {after!r}, which does not exist", param="after")
        query = query.where(table.c.seq < cursor if descending else table.c.seq > cursor)
    query = query.order_by(table.c.seq.desc() if descending else table.c.seq).limit(limit + 1)
    rows = conn.execute(query).mappings().all()
    return rows[:limit], len(rows) > limit


def from_row(cls: type[D], row: RowMapping, **computed: Any) -> D:
    """A ``cls`` (a dataclass) whose fields are the row's columns of the same names, but for those ``computed``."""
    named = {f.name: row[f.name] for f in fields(cls) if f.name not in computed}
    return cls(**named, **computed)
