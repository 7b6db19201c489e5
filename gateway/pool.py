"""Several vLLM replicas of one base model, and where a request for an adapter should go.

Each request a member serves holds a ``Lease`` on it: the member counts the request in flight, holds its adapter
version loaded, loads it again when vLLM has forgotten it (a 404: vLLM restarted since the last poll), and marks
its replica down when it stops accepting connections.

Placement prefers a healthy replica that already holds the adapter, so a request does not pay for a
load and other adapters are not evicted (affinity). A replica past ``saturation`` requests in flight
makes a hot adapter spread to the least loaded replica with a free slot; one past ``max_in_flight``
takes nothing new (overload). Replicas that stop answering are skipped until their monitor sees them
again, which also drops the adapters they forgot.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import httpx

from adapters import AdapterVersion
from core.errors import InvalidRequest, QuiverError
from gateway.health import ReplicaMonitor
from gateway.residency import Residency, Resident
from gateway.upstream import VllmReplica, unreachable

Placement = Literal["affinity", "round_robin"]


@dataclass
class Member:
    """One replica with its residency table, its monitor, and the requests it is serving now."""

    replica: VllmReplica
    residency: Residency
    monitor: ReplicaMonitor
    in_flight: int = 0

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def healthy(self) -> bool:
        return self.replica.state == "up"

    def load(self) -> float:
        """Requests in flight now (read by the metrics at scrape time)."""
        return self.in_flight

    @asynccontextmanager
    async def lease(self, version: AdapterVersion | None = None) -> AsyncIterator[Lease]:
        """One request here for the duration of the block: counted in flight, and ``version`` (an adapter's)
        held loaded. Entering raises what loading raised: vLLM refused the files, or no slot came free."""
        self.in_flight += 1
        try:
            if version is None:
                yield Lease(self)
                return
            async with self.residency.lease(version) as resident:
                yield Lease(self, version, resident)
        finally:
            self.in_flight -= 1

    def mark_down(self, reason: str) -> None:
        """The replica stopped answering: skipped until its monitor sees it again, its adapters forgotten."""
        self.monitor.mark_down(reason)


@dataclass(frozen=True)
class Lease:
    """One request's hold on a member (see ``Member.lease``), through which it is sent."""

    member: Member
    version: AdapterVersion | None = None
    resident: Resident | None = None

    async def open(self, endpoint: str, body: bytes) -> httpx.Response:
        """POST ``body`` to the replica; the response's body is not read yet. An adapter vLLM no longer knows is
        loaded again and asked once more; a replica that does not accept connections is marked down."""
        try:
            return await self._open(endpoint, body)
        except QuiverError as exc:
            if unreachable(exc):
                self.member.mark_down(exc.message)
            raise

    async def _open(self, endpoint: str, body: bytes) -> httpx.Response:
        replica = self.member.replica
        if self.version is None or self.resident is None:
            return await replica.open(endpoint, body)
        generation = self.resident.generation
        try:
            return await replica.open(endpoint, body)
        except InvalidRequest as exc:
            if exc.status_code != 404:
                raise
        # vLLM no longer knows the adapter: it restarted since our last health poll. Load it again and
        # ask once more; nothing has been sent to the client yet.
        await self.member.residency.reload(self.version, self.resident, generation)
        return await replica.open(endpoint, body)


class ReplicaPool:
    """The replicas a gateway sends base-model and adapter requests to."""

    def __init__(
        self, members: Sequence[Member], *, saturation: int, max_in_flight: int, placement: Placement = "affinity"
    ) -> None:
        if not members:
            raise ValueError("a pool needs at least one replica")
        self.members = tuple(members)
        self.saturation = saturation
        self.max_in_flight = max_in_flight
        self.placement = placement
        self._turn = itertools.count()

    @property
    def first(self) -> Member:
        """The first configured replica (the only one in the embedded default)."""
        return self.members[0]

    def usable(self) -> list[Member]:
        """Healthy replicas under the overload limit; else those not yet seen either way (still starting)."""
        open_ = [m for m in self.members if m.in_flight < self.max_in_flight]
        return [m for m in open_ if m.healthy] or [m for m in open_ if m.replica.state == "starting"]

    def place(self, lora_name: str | None) -> list[Member]:
        """The replicas to try for one request, best first; empty when none is usable (see ``why_empty``)."""
        usable = self.usable()
        if self.placement == "round_robin" and usable:
            start = next(self._turn) % len(usable)
            return usable[start:] + usable[:start]
        if lora_name is None:
            return sorted(usable, key=lambda m: m.in_flight)

        def rank(m: Member) -> tuple[int, int]:
            holds = m.residency.holds(lora_name)
            if holds and m.in_flight < self.saturation:
                return (0, m.in_flight)
            if not holds and m.residency.has_room():
                return (1, m.in_flight)
            return (2 if holds else 3, m.in_flight)

        return sorted(usable, key=rank)

    def why_empty(self) -> str:
        """The fallback reason when ``place`` found nothing."""
        return "overloaded" if any(m.healthy for m in self.members) else "no_healthy_replica"

    def member(self, url: str) -> Member | None:
        """The member whose replica is at ``url``."""
        return next((m for m in self.members if m.replica.url == url), None)

    async def check(self) -> None:
        """Poll every replica once."""
        await asyncio.gather(*(m.monitor.check() for m in self.members))

    async def watch(self, interval_s: float) -> None:
        """Poll every replica until cancelled."""
        await asyncio.gather(*(m.monitor.watch(interval_s) for m in self.members))

    async def discard(self, lora_name: str) -> None:
        """Unload a deleted version everywhere."""
        await asyncio.gather(*(m.residency.discard(lora_name) for m in self.members))

    async def aclose(self) -> None:
        """Unload what this gateway loaded and close the connection pools."""
        for m in self.members:
            await m.residency.unload_all()
            await m.replica.aclose()
