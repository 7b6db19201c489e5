"""A frontier API: any OpenAI-compatible upstream (a hosted API, another gateway, another vLLM).

Quiver sends it the request with the model name mapped to the upstream's, the key from the
environment, and streams its answer straight through. A 429 or 503 is retried when the upstream's
``Retry-After`` is short enough to wait for; a longer one is passed on as our own 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import cached_property

import httpx

from core.errors import Unavailable
from gateway.policy import FrontierConfig
from gateway.upstream import Upstream

log = logging.getLogger("quiver.frontier")


class Frontier(Upstream):
    """An OpenAI-compatible API reached over HTTP, with retries that honour ``Retry-After``."""

    def __init__(self, config: FrontierConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        super().__init__(
            config.base_url,
            connect_timeout_s=config.connect_timeout_s,
            request_timeout_s=config.timeout_s,
            headers={"authorization": f"Bearer {key}"} if key else None,
            transport=transport,
        )
        self.config = config
        # A frontier is not health-polled: it counts as up until a request says otherwise.
        self.state = "up"

    @cached_property
    def label(self) -> str:  # type: ignore[override]
        return f"frontier {self.config.name!r}"

    def _url(self, path: str) -> httpx.URL:
        # Our paths are the OpenAI API's (/v1/...); the frontier's base URL already ends in its version.
        return super()._url(path.removeprefix("/v1"))

    async def open(self, path: str, body: bytes) -> httpx.Response:
        """POST, retrying 429/503 answers whose Retry-After we can wait for."""
        for attempt in range(self.config.retries + 1):
            try:
                response = await super().open(path, body)
            except Unavailable as exc:
                # Only a busy answer is retried here; a refused connection goes to the next target.
                wait = exc.retry_after if exc.retry_after is not None else 1.0
                if exc.code != "upstream_busy" or attempt == self.config.retries or wait > self.config.max_retry_wait_s:
                    raise
                log.info("%s is busy; retrying in %.1f s (attempt %d)", self.label, wait, attempt + 1)
                await asyncio.sleep(wait)
                continue
            self.mark_up()
            return response
        raise AssertionError("unreachable")
