"""Usage rows: requests and tokens per minute, tenant, key and what served them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar


@dataclass(frozen=True)
class UsageRow:
    """One minute of one key's traffic to one target (``served_by``: ``name@vN``, the base, a frontier model)."""

    COUNTS: ClassVar[tuple[str, ...]] = ("requests", "errors", "prompt_tokens", "completion_tokens")

    minute: datetime
    tenant: str
    key_id: str  # "" for requests made while the gateway ran open
    served_by: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The row as the usage table's columns."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> UsageRow:
        """A row read from the usage table (SQLite hands back naive UTC times)."""
        minute: datetime = row["minute"]
        minute = minute.replace(tzinfo=UTC) if minute.tzinfo is None else minute.astimezone(UTC)
        return cls(minute, *(row[k] for k in ("tenant", "key_id", "served_by", *cls.COUNTS)))
