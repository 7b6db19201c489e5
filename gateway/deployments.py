"""Merged deployments: adapter versions merged into the base, each on a vLLM of its own.

The registry lists them (``quiver deploy merged``); this keeps one upstream per deployment, polls
each one's health, and tells the router which are healthy. A deployment that is removed or stops
answering simply drops out of plans, and its version is served from the LoRA pool again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from adapters import Catalog
from core.errors import QuiverError
from gateway.metrics import Metrics
from gateway.polling import poll
from gateway.upstream import VllmReplica

log = logging.getLogger("quiver.deployments")


class MergedDeployments:
    """The upstreams of the registry's merged deployments, kept in step with the catalog."""

    def __init__(self, catalog: Callable[[], Catalog], metrics: Metrics, make: Callable[[str], VllmReplica]) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self._make = make
        self._servers: dict[str, VllmReplica] = {}  # lora_name -> upstream
        self._retired: list[VllmReplica] = []

    def healthy(self, lora_name: str) -> tuple[VllmReplica, str] | None:
        """The upstream and model name serving ``lora_name`` merged, while it is registered and answering."""
        deployment = self._catalog().deployments.get(lora_name)
        server = self._servers.get(lora_name)
        if deployment is None or server is None or server.url != deployment.url or server.state != "up":
            return None
        return server, deployment.served_model

    def states(self) -> dict[str, str]:
        """Each known deployment's state, for /health."""
        return {name: server.state for name, server in self._servers.items()}

    async def check(self) -> None:
        """Follow the registry's list, then poll every deployment once."""
        wanted = self._catalog().deployments
        for name in [n for n, s in self._servers.items() if n not in wanted or wanted[n].url != s.url]:
            log.info("merged deployment %s removed; its version is served from the LoRA pool", name)
            # In-flight requests may still be reading from it: its connections close at shutdown.
            self._retired.append(self._servers.pop(name))
        for name, deployment in wanted.items():
            if name not in self._servers:
                self._servers[name] = self._make(deployment.url)
        await asyncio.gather(*(self._poll(name, server) for name, server in list(self._servers.items())))

    async def _poll(self, name: str, server: VllmReplica) -> None:
        try:
            await server.models()
        except QuiverError as exc:
            if server.state != "down":
                log.warning("merged deployment %s at %s is down: %s", name, server.url, exc.message)
            server.state = "down"
            self._metrics.upstream_up.labels(server.url).set(0)
            return
        if server.state != "up":
            log.info("merged deployment %s at %s is up", name, server.url)
        server.mark_up()
        self._metrics.upstream_up.labels(server.url).set(1)

    async def watch(self, interval_s: float) -> None:
        """Poll until cancelled."""
        await poll(self.check, interval_s, log, "checking merged deployments failed; trying again")

    async def aclose(self) -> None:
        """Close every connection pool."""
        for server in [*self._servers.values(), *self._retired]:
            await server.aclose()
        self._servers.clear()
        self._retired.clear()
