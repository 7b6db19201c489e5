"""Usage per key, tenant and target, counted in memory and added to the registry's usage table every second."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from access.usage import UsageRow
from gateway.auth import Principal
from gateway.polling import poll

log = logging.getLogger("quiver.usage")

_Key = tuple[datetime, str, str, str]


class UsageLedger(Protocol):
    """Where counted usage goes (``RegistryView``: the usage table)."""

    async def record_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add ``rows`` to what was recorded."""


class UsageMeter:
    """Counts each answered request; ``flush`` writes the counts and forgets them."""

    def __init__(self, ledger: UsageLedger) -> None:
        self._ledger = ledger
        self._counts: dict[_Key, Counter[str]] = {}

    def record(
        self, principal: Principal, served_by: str, ok: bool, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """One request of ``principal`` answered by ``served_by``; on the hot path, so only a dict update."""
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        key = (minute, principal.tenant, principal.key_id or "", served_by)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = Counter()
        counts.update(
            requests=1, errors=0 if ok else 1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )

    async def flush(self) -> None:
        """Add what was counted since the last flush to the usage table; kept for the next one if that fails."""
        if not self._counts:
            return
        taken, self._counts = self._counts, {}
        rows = [
            UsageRow(minute, tenant, key_id, served_by, *(counts[c] for c in UsageRow.COUNTS))
            for (minute, tenant, key_id, served_by), counts in taken.items()
        ]
        try:
            await self._ledger.record_usage(rows)
        except BaseException:
            for key, counts in taken.items():  # put them back, merged with what came in meanwhile
                self._counts.setdefault(key, Counter()).update(counts)
            raise

    async def watch(self, interval_s: float) -> None:
        """Flush every ``interval_s`` until cancelled."""
        await poll(self.flush, interval_s, log, "writing usage failed; keeping the counts for the next try")
