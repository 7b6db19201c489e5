"""Which adapter versions are loaded in a vLLM replica, and loading them on demand.

Loads happen under a per-version asyncio lock, so many concurrent first requests for one version
make exactly one load. Residency is an LRU bounded by the replica's ``max_loras``; a version with
requests in flight is never unloaded, so a request always finishes on the version it started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapters import AdapterVersion
from core.errors import QuiverError, Unavailable
from gateway.metrics import Metrics
from gateway.upstream import VllmReplica

if TYPE_CHECKING:
    from gateway.hints import ResidencyHints

log = logging.getLogger("quiver.residency")


@dataclass
class Resident:
    """One loaded version: when it was loaded, how often, and how many requests use it now."""

    loaded_at: float
    in_flight: int = 0
    generation: int = 0
    used_at: float = 0.0  # Unix time of the last lease, comparable with other gateways' residency hints


@dataclass
class Residency:
    """The LRU of adapter versions loaded in one replica."""

    replica: VllmReplica
    capacity: int
    metrics: Metrics
    load_wait_s: float = 60.0
    # How long a load waits for a slot to free up when every slot serves requests; then 503.
    slot_wait_s: float = 30.0
    # Several gateways in front of the same replicas: the LRU orders by the last use any of them saw.
    hints: ResidencyHints | None = None
    _resident: OrderedDict[str, Resident] = field(default_factory=OrderedDict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _reserved: int = 0
    _slots: asyncio.Lock = field(default_factory=asyncio.Lock)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def loaded(self) -> list[str]:
        """Loaded ``lora_name``s, least recently used first."""
        return list(self._resident)

    def holds(self, name: str) -> bool:
        """Whether ``name`` is loaded (or being loaded) here."""
        lock = self._locks.get(name)
        return name in self._resident or (lock is not None and lock.locked())

    def in_flight(self, name: str) -> int:
        """How many requests are being served on ``name`` now (0 when it is not loaded)."""
        resident = self._resident.get(name)
        return 0 if resident is None else resident.in_flight

    def has_room(self) -> bool:
        """Whether one more version can be loaded now without waiting for requests to finish."""
        if len(self._resident) + self._reserved < self.capacity:
            return True
        return any(r.in_flight == 0 for r in self._resident.values())

    @asynccontextmanager
    async def lease(self, version: AdapterVersion) -> AsyncIterator[Resident]:
        """Hold ``version`` loaded for the duration of one request."""
        name = version.lora_name
        await self.ensure_loaded(version)
        # No await between the check above and this increment, so eviction cannot slip in.
        resident = self._resident[name]
        resident.in_flight += 1
        resident.used_at = time.time()
        self._resident.move_to_end(name)
        if self.hints is not None:
            self.hints.touch(self.replica.url, name)
        try:
            yield resident
        finally:
            resident.in_flight -= 1
            if resident.in_flight == 0:
                self._released.set()

    async def ensure_loaded(self, version: AdapterVersion) -> None:
        """Load ``version`` into the replica unless it is already there."""
        name = version.lora_name
        if name in self._resident:
            return
        lock = self._locks.setdefault(name, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout=self.load_wait_s)
        except TimeoutError:
            raise Unavailable(f"adapter {name} is still loading", retry_after=1.0, code="adapter_loading") from None
        try:
            if name in self._resident:
                return
            await self._reserve_slot(name)
            try:
                await self._load(version)
            finally:
                self._reserved -= 1
        finally:
            lock.release()

    async def reload(self, version: AdapterVersion, resident: Resident, generation: int) -> None:
        """vLLM answered that it does not know a version we hold (it restarted): load it again.

        The same record is kept, so requests in flight on it still protect it from eviction;
        concurrent callers that saw the same ``generation`` make a single load.
        """
        name = version.lora_name
        async with self._locks.setdefault(name, asyncio.Lock()):
            if resident.generation != generation:
                return
            await self._load(version, resident)
            if name not in self._resident:
                self._resident[name] = resident
                self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))

    async def _load(self, version: AdapterVersion, resident: Resident | None = None) -> None:
        name = version.lora_name
        started = time.perf_counter()
        try:
            await self.replica.load_adapter(name, str(version.path))
        except Exception:
            self.metrics.adapter_loads.labels(name, "error").inc()
            raise
        self.metrics.adapter_loads.labels(name, "ok").inc()
        self.metrics.adapter_load_seconds.labels(name).observe(time.perf_counter() - started)
        if resident is None:
            self._resident[name] = Resident(loaded_at=time.monotonic())
        else:
            resident.loaded_at, resident.generation = time.monotonic(), resident.generation + 1
        self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))
        log.info("loaded %s from %s in %.0f ms", name, version.path, 1000 * (time.perf_counter() - started))

    async def _reserve_slot(self, name: str) -> None:
        deadline = time.monotonic() + self.slot_wait_s
        async with self._slots:
            while len(self._resident) + self._reserved >= self.capacity:
                victim = await self._victim([n for n, r in self._resident.items() if r.in_flight == 0])
                if victim is not None and (victim not in self._resident or self._resident[victim].in_flight):
                    continue  # leased (or dropped) while the hints were asked: choose again
                if victim is None:
                    # Every slot serves requests: wait for one to finish rather than turn this one away at once.
                    self._released.clear()
                    try:
                        await asyncio.wait_for(self._released.wait(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        raise Unavailable(
                            f"all {self.capacity} adapter slots hold adapters with requests in flight; "
                            f"cannot load {name} now",
                            retry_after=1.0,
                            code="adapter_slots_busy",
                        ) from None
                    continue
                del self._resident[victim]
                self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))
                self.metrics.adapter_unloads.labels(victim).inc()
                log.info("unloading %s to make room for %s", victim, name)
                await self.replica.unload_adapter(victim)
            self._reserved += 1

    async def _victim(self, idle: list[str]) -> str | None:
        """The idle version to unload: least recently used here, or by any gateway when there are hints."""
        if self.hints is None or len(idle) < 2:
            return idle[0] if idle else None
        shared = await self.hints.last_use(self.replica.url, idle)
        return min(idle, key=lambda n: max(self._resident[n].used_at, shared.get(n, 0.0)))

    def reconcile(self, present: set[str], polled_since: float) -> None:
        """Forget versions the replica no longer lists (it restarted), unless loaded after the poll began."""
        gone = [n for n, r in self._resident.items() if n not in present and r.loaded_at < polled_since]
        for name in gone:
            if self._resident[name].in_flight == 0:
                del self._resident[name]
                log.warning("vLLM at %s no longer has %s; it will be loaded again on use", self.replica.url, name)
        self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))

    async def discard(self, name: str) -> None:
        """Unload a deleted version now rather than when the LRU gets to it; busy ones wait for the LRU."""
        resident = self._resident.get(name)
        if resident is None or resident.in_flight:
            return
        del self._resident[name]
        self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))
        try:
            await self.replica.unload_adapter(name)
        except QuiverError as exc:  # vLLM is down: it has forgotten the adapter anyway.
            log.info("could not unload deleted %s: %s", name, exc.message)

    async def unload_all(self) -> None:
        """Best-effort unload of everything this gateway loaded, at shutdown."""
        for name in list(self._resident):
            try:
                await self.replica.unload_adapter(name)
            except Exception as exc:  # vLLM may already be gone; nothing to clean then.
                log.info("could not unload %s at shutdown: %s", name, exc)
        self._resident.clear()
        self.metrics.adapters_resident.labels(self.replica.name).set(0)

    def forget_all(self) -> None:
        """The replica went away: nothing can be assumed loaded when it returns."""
        for name in [n for n, r in self._resident.items() if r.in_flight == 0]:
            del self._resident[name]
        self.metrics.adapters_resident.labels(self.replica.name).set(len(self._resident))
