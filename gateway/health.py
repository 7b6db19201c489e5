"""Watching a vLLM replica: is it up, and which adapters does it really hold.

A restarted vLLM has forgotten every runtime-loaded adapter. The monitor notices (the replica
stops answering, or its model list lacks adapters we loaded) and drops them from residency, so
the next request for one loads it again with no manual step.
"""

from __future__ import annotations

import logging
import time

from core.errors import QuiverError, Unavailable
from gateway.metrics import Metrics
from gateway.polling import poll
from gateway.residency import Residency
from gateway.upstream import VllmReplica

log = logging.getLogger("quiver.health")


class ReplicaMonitor:
    """Polls one replica's ``/v1/models`` and reconciles residency with what it lists."""

    def __init__(self, replica: VllmReplica, residency: Residency, metrics: Metrics) -> None:
        self.replica = replica
        self.residency = residency
        self.metrics = metrics

    async def check(self) -> None:
        """One poll."""
        polled = time.monotonic()
        try:
            models = await self.replica.models()
        except Unavailable as exc:
            self.mark_down(exc.message)
            return
        except QuiverError as exc:
            # Slow or erroring but still there: keep the adapter table, which is still true.
            log.warning("vLLM at %s answered its health check badly: %s", self.replica.url, exc.message)
            return
        if self.replica.state != "up":
            log.info("vLLM at %s is up, serving %s", self.replica.url, self.replica.served_model)
        self.replica.mark_up()
        self.metrics.upstream_up.labels(self.replica.url).set(1)
        self.residency.reconcile({str(m["id"]) for m in models if m.get("parent")}, polled)

    def mark_down(self, reason: str) -> None:
        """The replica stopped answering: whatever it had loaded is gone when it returns."""
        if self.replica.state != "down":
            log.warning("vLLM at %s is down: %s", self.replica.url, reason)
            self.replica.state = "down"
        self.metrics.upstream_up.labels(self.replica.url).set(0)
        self.residency.forget_all()

    async def watch(self, interval_s: float) -> None:
        """Poll until cancelled."""
        await poll(self.check, interval_s, log, f"health check of vLLM at {self.replica.url} failed; trying again")
