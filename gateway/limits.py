"""Per-minute limits on requests and tokens, for each key and each tenant, in-process or shared through Redis.

A request costs one request and ``prompt tokens + max(n, best_of) x max_tokens`` tokens (what it may consume at
most: each of the completions it asks vLLM to generate may take ``max_tokens``; the prompt counted exactly, with the
tokenizer of the target its plan tries first: the base model's, or tiktoken for a frontier). It is admitted only if
all four counters (key requests, key tokens, tenant requests, tenant tokens) have room, and only then
charged to them, so a refused request costs nothing. Windows are the ``limits`` library's sliding-window
counters: in memory by default, in Redis when several gateways must share them. Every answer carries
OpenAI's ``x-ratelimit-*`` headers for the tightest of the limits that apply.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import ConnectionPool

from core.errors import RateLimited
from gateway.auth import Principal
from gateway.metrics import Metrics
from gateway.tokens import Prompt, completion_budget

log = logging.getLogger("quiver.limits")

PREFIX = "quiver:rl"


@dataclass(frozen=True)
class _Check:
    """One counter a request is charged to."""

    name: str  # key_requests | key_tokens | tenant_requests | tenant_tokens
    kind: str  # requests | tokens
    item: RateLimitItem
    identifier: str
    cost: int


def reset_text(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def choices(payload: dict[str, Any]) -> int:
    """How many completions the request makes the upstream generate: ``n``, or ``best_of`` when it asks for more
    (both capped by the route)."""
    given = (payload.get(name) for name in ("n", "best_of"))
    return max((value for value in given if isinstance(value, int)), default=1)


class RateLimiter:
    """Admits or refuses each request against its key's and tenant's per-minute limits."""

    def __init__(self, storage: Storage, metrics: Metrics, pool: ConnectionPool | None = None) -> None:
        self._storage = storage
        self._pool = pool
        self._windows = SlidingWindowCounterRateLimiter(storage)
        self._metrics = metrics

    @classmethod
    def create(cls, redis_url: str | None, metrics: Metrics) -> RateLimiter:
        """In-process counters, or counters in the Redis at ``redis_url`` shared by every gateway using it."""
        if redis_url is None:
            return cls(MemoryStorage(), metrics)
        # Our own pool, so the connections can be closed at shutdown; short timeouts, since a request waits on it.
        pool = ConnectionPool.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        options: Any = {"connection_pool": pool}  # typed as scalars in limits, but passed on to redis-py
        storage = RedisStorage("async+" + redis_url, implementation="redispy", key_prefix=PREFIX, **options)
        return cls(storage, metrics, pool)

    async def admit(self, principal: Principal, prompt: Prompt, *, frontier: bool) -> dict[str, str]:
        """Charge the request to its counters and return the ``x-ratelimit-*`` headers; RateLimited (429) if
        any counter lacks room. ``frontier``: its first target is a frontier, whose tokenizer counts the prompt."""
        limits = (
            ("key", principal.key_id, principal.key_limits),
            ("tenant", principal.tenant, principal.tenant_limits),
        )
        tokens = None
        checks: list[_Check] = []
        for scope, who, given in limits:
            if given.requests_per_min is not None:
                item = RateLimitItemPerMinute(given.requests_per_min)
                checks.append(_Check(f"{scope}_requests", "requests", item, f"{scope}:{who}:requests", 1))
            if given.tokens_per_min is not None:
                if tokens is None:  # tokenizing costs time: only when a token limit applies
                    payload = prompt.payload
                    tokens = await prompt.tokens(frontier=frontier) + choices(payload) * completion_budget(payload)
                item = RateLimitItemPerMinute(given.tokens_per_min)
                checks.append(_Check(f"{scope}_tokens", "tokens", item, f"{scope}:{who}:tokens", tokens))
        if not checks:
            return {}
        for check in checks:
            if not await self._windows.test(check.item, check.identifier, cost=check.cost):
                await self._refuse(principal, check, checks)
        for check in checks:
            # Another request may have taken the room since the test (another gateway, or this one): refuse.
            if not await self._windows.hit(check.item, check.identifier, cost=check.cost):
                await self._refuse(principal, check, checks)
        return await self._headers(checks)

    async def _refuse(self, principal: Principal, failed: _Check, checks: list[_Check]) -> None:
        self._metrics.rate_limited.labels(principal.tenant, failed.name).inc()
        stats = await self._windows.get_window_stats(failed.item, failed.identifier)
        wait = max(0.001, stats.reset_time - time.time())
        limit = failed.item.amount
        if failed.cost > limit:
            message = f"this request needs {failed.cost} tokens, more than the {limit} a minute of its {failed.name}"
        else:
            message = f"rate limit reached: {failed.name.replace('_', ' ')} {limit} per minute; retry in {wait:.1f} s"
        headers = await self._headers(checks)
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        raise RateLimited(message, retry_after=wait, headers=headers)

    async def _headers(self, checks: list[_Check]) -> dict[str, str]:
        """OpenAI's headers for the tightest requests limit and the tightest tokens limit."""
        headers: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            tightest: tuple[int, int, float] | None = None
            for check in (c for c in checks if c.kind == kind):
                stats = await self._windows.get_window_stats(check.item, check.identifier)
                if tightest is None or stats.remaining < tightest[1]:
                    tightest = (check.item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()))
            if tightest is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, tightest[1]))
                headers[f"x-ratelimit-reset-{kind}"] = reset_text(tightest[2])
        return headers

    async def aclose(self) -> None:
        """Close the Redis connections, if any."""
        if self._pool is not None:
            await self._pool.aclose()
