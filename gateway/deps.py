"""The gateway's running parts, hung on ``app.state``, and their FastAPI dependency aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from gateway.auth import Authenticator
from gateway.deployments import MergedDeployments
from gateway.frontier import Frontier
from gateway.health import ReplicaMonitor
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.pool import ReplicaPool
from gateway.rag.target import RagTarget
from gateway.registry_view import RegistryView
from gateway.residency import Residency
from gateway.router import Router
from gateway.serving import Proxy
from gateway.settings import Settings
from gateway.uploads import UploadSlots
from gateway.upstream import VllmReplica
from gateway.usage import UsageMeter

if TYPE_CHECKING:
    from gateway.hints import ResidencyHints


@dataclass
class Gateway:
    """Everything one running gateway holds; built in the app's lifespan."""

    settings: Settings
    metrics: Metrics
    pool: ReplicaPool
    registry: RegistryView
    router: Router
    proxy: Proxy
    frontiers: dict[str, Frontier]
    rag: RagTarget
    merged: MergedDeployments
    auth: Authenticator
    usage: UsageMeter
    limiter: RateLimiter
    uploads: UploadSlots
    hints: ResidencyHints | None = None

    # The first replica's parts: the only ones in the embedded default.
    @property
    def replica(self) -> VllmReplica:
        return self.pool.first.replica

    @property
    def residency(self) -> Residency:
        return self.pool.first.residency

    @property
    def monitor(self) -> ReplicaMonitor:
        return self.pool.first.monitor


async def gateway_of(request: Request) -> Gateway:
    """The running gateway; async so FastAPI does not hop to a worker thread to call it."""
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(gateway_of)]
