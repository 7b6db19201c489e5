"""The gateway's view of the registry: an in-memory Catalog, so routing never touches the database.

Writes made through this gateway refresh the snapshot before they answer, so an alias moved by
the API takes effect on the very next request. Writes made elsewhere (the CLI, another gateway)
are noticed by polling the registry's revision counter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

from adapters import Catalog, Registry
from gateway.polling import poll

log = logging.getLogger("quiver.registry")

T = TypeVar("T")


class RegistryView:
    """Holds the current Catalog and runs blocking registry calls off the event loop."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.catalog: Catalog = registry.snapshot()

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a registry method in a worker thread, then refresh the snapshot."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            await self.refresh()

    async def refresh(self) -> None:
        """Take a new snapshot if the registry changed since the last one."""
        catalog = await anyio.to_thread.run_sync(self._load)
        # Two refreshes may finish out of order; never put an older snapshot back.
        if catalog is not None and catalog.revision > self.catalog.revision:
            self.catalog = catalog

    def _load(self) -> Catalog | None:
        if self.registry.revision() == self.catalog.revision:
            return None
        return self.registry.snapshot()

    async def watch(self, interval_s: float) -> None:
        """Poll for outside writes until cancelled."""
        await poll(self.refresh, interval_s, log, "registry refresh failed; keeping the last snapshot")
