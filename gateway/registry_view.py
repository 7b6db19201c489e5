"""The gateway's view of the registry: an in-memory Catalog and KeyRing, so routing never touches the database,
and the one async way to the stores behind them (adapters, deployments, keys, usage).

Writes made through this gateway refresh the snapshot before they answer, so an alias moved by
the API takes effect on the very next request. Writes made elsewhere (the CLI, another gateway)
are noticed by polling the registry's revision counter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from access.keys import KeyRing
from access.store import KeyStore, UsageStore
from access.usage import UsageRow
from adapters import Adapter, Catalog, Deployment, DeploymentStore, PushResult, Registry
from adapters.registry import UNSET, Unset
from gateway.polling import poll

log = logging.getLogger("quiver.registry")

T = TypeVar("T")


class RegistryView:
    """Holds the current Catalog and KeyRing; its async methods run the blocking stores in a worker thread."""

    def __init__(self, registry: Registry, deployments: DeploymentStore, keys: KeyStore, usage: UsageStore) -> None:
        self._registry = registry
        self._deployments = deployments
        self._key_store = keys
        self._usage = usage
        self.catalog: Catalog = registry.snapshot()
        self.keys: KeyRing = keys.key_ring()
        self._derived: dict[Hashable, tuple[Catalog, Any]] = {}

    @classmethod
    def over(cls, registry: Registry) -> RegistryView:
        """The view of ``registry`` and the stores over its database; blocking, as it reads the first snapshot."""
        database = registry.database
        return cls(registry, DeploymentStore.beside(registry), KeyStore(database), UsageStore(database))

    def close(self) -> None:
        """Release the database (blocking)."""
        self._registry.close()

    # -- adapters -------------------------------------------------------------------------------

    async def push_archive(self, name: str, archive: Path, *, tenant: str | None) -> PushResult:
        """``Registry.push_archive``; the new version is served from the next request on."""
        return await self._call(partial(self._registry.push_archive, name, archive, tenant=tenant))

    async def adapters(self) -> list[Adapter]:
        """Every adapter, read from the database."""
        return await self._call(self._registry.adapters)

    async def adapter(self, name: str) -> Adapter:
        """The adapter ``name`` read from the database; NotFound if there is none."""
        return await self._call(partial(self._registry.adapter, name))

    async def set_routing(
        self,
        name: str,
        *,
        description: str | None | Unset = UNSET,
        examples: Sequence[str] | Unset = UNSET,
        fallback: Sequence[str] | None | Unset = UNSET,
    ) -> Adapter:
        """``Registry.set_routing``: arguments left out keep their value."""
        work = partial(self._registry.set_routing, name, description=description, examples=examples, fallback=fallback)
        return await self._call(work)

    async def set_alias(self, name: str, alias: str, number: int, *, force: bool = False) -> Adapter:
        """``Registry.set_alias``: point ``name@alias`` at version ``number``."""
        return await self._call(partial(self._registry.set_alias, name, alias, number, force=force))

    async def delete_alias(self, name: str, alias: str) -> None:
        """``Registry.delete_alias``."""
        await self._call(partial(self._registry.delete_alias, name, alias))

    async def delete_version(self, name: str, number: int) -> None:
        """``Registry.delete_version``: refused while an alias or a deployment uses it."""
        await self._call(partial(self._registry.delete_version, name, number))

    # -- deployments ----------------------------------------------------------------------------

    async def deployments(self) -> list[Deployment]:
        """Every deployment, read from the database."""
        return await self._call(self._deployments.deployments)

    async def remove_deployment(self, name: str, number: int) -> Deployment:
        """Unregister version ``number``'s deployment; its traffic returns to the adapter from the next request on."""
        return await self._call(partial(self._deployments.remove_deployment, name, number))

    # -- keys and usage -------------------------------------------------------------------------

    async def record_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add counts to the usage table (no registry change: nothing to refresh)."""
        await anyio.to_thread.run_sync(self._usage.record_usage, rows)

    async def usage(
        self,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        served_by: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        """``UsageStore.usage``: recorded usage, every filter given matching."""
        work = partial(self._usage.usage, tenant=tenant, key_id=key_id, served_by=served_by, since=since, until=until)
        return await anyio.to_thread.run_sync(work)

    # -- the snapshot ---------------------------------------------------------------------------

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

    async def watch(self, interval_s: float) -> None:
        """Poll for outside writes until cancelled."""
        await poll(self.refresh, interval_s, log, "registry refresh failed; keeping the last snapshot")

    async def _call(self, work: Callable[[], T]) -> T:
        """Run a store call in a worker thread, then refresh the snapshot, also when it failed: after a write the
        next request sees the change; after a read this gateway serves at least what the caller was shown."""
        try:
            return await anyio.to_thread.run_sync(work)
        finally:
            await self.refresh()

    def _load(self) -> tuple[Catalog, KeyRing] | None:
        if self._registry.revision() == self.catalog.revision:
            return None
        # The keys after the catalog: they are then at least as new as the revision the view records, so a
        # key revoked between the two reads is seen now, not missed until some later change.
        catalog = self._registry.snapshot()
        return catalog, self._key_store.key_ring()
