"""The gateway's background polls: health of replicas and merged deployments, registry and RAG changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def poll(check: Callable[[], Awaitable[None]], interval_s: float, log: logging.Logger, failed: str) -> None:
    """Every ``interval_s`` (the first one after a wait: start-up made the first check), run ``check`` until
    cancelled; a failure is logged with ``failed`` and the next round tries again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await check()
        except Exception:
            log.exception("%s", failed)
