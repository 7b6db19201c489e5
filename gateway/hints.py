"""Residency hints shared by several gateways through Redis: when each adapter was last used on each replica.

Each gateway keeps its own LRU of what it loaded, but the replicas are shared: without hints, one
gateway evicts the adapter another gateway's traffic uses all the time, because it has not used it
itself for a while. With hints the LRU orders by the last use seen by any gateway. Hints are advice:
uses are sent in batches, and when Redis is away each gateway falls back to its own LRU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.polling import poll

log = logging.getLogger("quiver.hints")

PREFIX = "quiver:residency:"


class ResidencyHints:
    """The last use (Unix time) of ``name@vN`` on each replica, across every gateway sharing one Redis."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._pending: dict[tuple[str, str], float] = {}

    @classmethod
    def from_url(cls, url: str) -> ResidencyHints:
        """Hints kept in the Redis at ``url`` (``redis://host:port/db``)."""
        return cls(Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0))

    def touch(self, replica: str, name: str) -> None:
        """``name`` is used on ``replica`` now; a dict write, sent with the next ``flush``."""
        self._pending[(replica, name)] = time.time()

    async def flush(self) -> None:
        """Send the uses noted since the last flush (a use only ever moves forward: ``ZADD GT``)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        by_replica: dict[str, dict[str, float]] = {}
        for (replica, name), used in pending.items():
            by_replica.setdefault(replica, {})[name] = used
        async with self._client.pipeline(transaction=False) as pipe:
            for replica, uses in by_replica.items():
                pipe.zadd(PREFIX + replica, uses, gt=True)
            await pipe.execute()

    async def last_use(self, replica: str, names: Sequence[str]) -> dict[str, float]:
        """When each of ``names`` was last used on ``replica`` by any gateway; empty when Redis does not answer."""
        if not names:
            return {}
        try:
            scores = await self._client.zmscore(PREFIX + replica, list(names))
        except (RedisError, OSError) as exc:
            log.warning("residency hints unavailable, using this gateway's own LRU: %s", exc)
            return {}
        return {n: float(s) for n, s in zip(names, scores, strict=True) if s is not None}

    async def forget(self, replica: str, names: Sequence[str]) -> None:
        """Drop hints of versions that no longer exist."""
        if names:
            await self._client.zrem(PREFIX + replica, *names)

    async def watch(self, interval_s: float) -> None:
        """Flush every ``interval_s`` until cancelled."""
        await poll(self.flush, interval_s, log, "sending residency hints failed; trying again")

    async def aclose(self) -> None:
        """Send what is pending and close the connection."""
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            log.info("could not send the last residency hints: %s", exc)
        await self._client.aclose()
