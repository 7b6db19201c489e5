"""The gateway's view of the registry: an in-memory Catalog, so routing never touches the database.

Writes made through this gateway refresh the snapshot before they answer, so an alias moved by
the API takes effect on the very next request. Writes made elsewhere (the CLI, another gateway)
are noticed by polling the registry's revision counter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import anyio.to_thread

from access.keys import KeyRing
from adapters import Catalog, Registry
from gateway.polling import poll

log = logging.getLogger("quiver.registry")

T = TypeVar("T")


class RegistryView:
    """Holds the current Catalog and KeyRing, and runs blocking registry calls off the event loop."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.catalog: Catalog = registry.snapshot()
        self.keys: KeyRing = registry.key_ring()
        self._derived: dict[Hashable, tuple[Catalog, Any]] = {}

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a registry method in a worker thread, then refresh the snapshot."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            await self.refresh()

    def derived(self, key: Hashable, build: Callable[[Catalog], T]) -> T:
        """``build(catalog)`` for the current snapshot, built once per snapshot and ``key``.

        For what is costly to make from a large catalog on every request (the ``/v1/models`` body).
        """
        catalog = self.catalog
        held = self._derived.get(key)
        if held is None or held[0] is not catalog:
            held = self._derived[key] = (catalog, build(catalog))
        value: T = held[1]
        return value

    async def refresh(self) -> None:
        """Take a new snapshot if the registry changed since the last one."""
        loaded = await anyio.to_thread.run_sync(self._load)
        # Two refreshes may finish out of order; never put an older snapshot back.
        if loaded is not None and loaded[0].revision > self.catalog.revision:
            self.catalog, self.keys = loaded

    def _load(self) -> tuple[Catalog, KeyRing] | None:
        if self.registry.revision() == self.catalog.revision:
            return None
        # The keys after the catalog: they are then at least as new as the revision the view records, so a
        # key revoked between the two reads is seen now, not missed until some later change.
        catalog = self.registry.snapshot()
        return catalog, self.registry.key_ring()

    async def watch(self, interval_s: float) -> None:
        """Poll for outside writes until cancelled."""
        await poll(self.refresh, interval_s, log, "registry refresh failed; keeping the last snapshot")
