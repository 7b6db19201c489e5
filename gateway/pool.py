"""Several vLLM replicas of one base model, and where a request for an adapter should go.

Placement prefers a healthy replica that already holds the adapter, so a request does not pay for a
load and other adapters are not evicted (affinity). A replica past ``saturation`` requests in flight
makes a hot adapter spread to the least loaded replica with a free slot; one past ``max_in_flight``
takes nothing new (overload). Replicas that stop answering are skipped until their monitor sees them
again, which also drops the adapters they forgot.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.health import ReplicaMonitor
from gateway.residency import Residency
from gateway.upstream import VllmReplica

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
