"""``create_app(settings)``: the gateway as an ASGI app, with its parts built in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters import BaseModelSpec
from core.embeddings import Embedder
from core.errors import QuiverError
from gateway import admin, files, fine_tuning, routes
from gateway.auth import Authenticator
from gateway.auto import SemanticRouter
from gateway.bodies import BodyLimit
from gateway.deployments import MergedDeployments
from gateway.deps import Gateway
from gateway.frontier import Frontier
from gateway.health import ReplicaMonitor
from gateway.hints import ResidencyHints
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.observability import AccessLog, RequestContext, Tracing
from gateway.pool import Member, ReplicaPool
from gateway.protocol import error_response, invalid_request
from gateway.rag import RagPath, index_url, open_index
from gateway.rag.target import RagTarget
from gateway.registry_view import RegistryView
from gateway.residency import Residency
from gateway.router import Router
from gateway.serving import Proxy
from gateway.settings import Settings
from gateway.stores import open_registry
from gateway.tokens import PromptMeter
from gateway.uploads import UploadSlots
from gateway.upstream import VllmReplica
from gateway.usage import UsageMeter

log = logging.getLogger("quiver.gateway")

# The multipart uploads, which check their own, larger limits while spooling to disk.
SPOOLED_UPLOADS = (("POST", "/v1/adapters"), ("POST", "/v1/files"))


def base_model_dir(settings: Settings, replica: VllmReplica) -> Path | None:
    """The served base model's directory: configured, else vLLM's model root when that is a local model."""
    if settings.base_model_path is not None:
        return settings.base_model_path
    root = Path(replica.model_root) if replica.model_root else None
    return root if root is not None and (root / "config.json").is_file() else None


async def _base_spec(settings: Settings, replica: VllmReplica) -> BaseModelSpec | None:
    """The served base model's architecture, for checking uploads against it."""
    if settings.base_model_path is None:
        with suppress(QuiverError):
            await replica.models()
    path = base_model_dir(settings, replica)
    if path is None:
        log.warning(
            "base model directory unknown (set QUIVER_BASE_MODEL_PATH); uploads are checked "
            "for consistency but not against the base model's layer shapes"
        )
        return None
    try:
        return await anyio.to_thread.run_sync(BaseModelSpec.from_model_dir, path, settings.base_model)
    except FileNotFoundError as exc:  # weights only as pytorch_model.bin: their shapes need torch to read
        log.warning("%s; uploads are checked for consistency but not against the base model's layer shapes", exc)
        return None


async def _build(
    settings: Settings, transport: httpx.AsyncBaseTransport | None, tracing: Tracing, stack: AsyncExitStack
) -> Gateway:
    """The gateway's parts; each one that holds something is closed by ``stack``, in the reverse order of building."""
    metrics = Metrics()
    policy = settings.routing
    hints = ResidencyHints.from_url(settings.redis_url) if settings.redis_url else None
    if hints is not None:
        stack.push_async_callback(hints.aclose)
    members = []
    for i, url in enumerate(settings.vllm_urls):
        replica = _replica(settings, url, f"r{i}", transport, tracing)
        residency = Residency(
            replica,
            settings.max_loras,
            metrics,
            load_wait_s=settings.adapter_load_timeout_s,
            slot_wait_s=settings.adapter_slot_wait_s,
            hints=hints,
        )
        member = Member(replica, residency, ReplicaMonitor(replica, residency, metrics))
        # Read when scraped: nothing to update on the request path.
        metrics.replica_in_flight.labels(member.name).set_function(member.load)
        members.append(member)
    pool = ReplicaPool(
        members,
        saturation=settings.replica_saturation,
        max_in_flight=settings.replica_max_in_flight,
        placement=settings.placement,
    )
    stack.push_async_callback(pool.aclose)  # unloads what this gateway loaded
    base = await _base_spec(settings, pool.first.replica)
    registry = await anyio.to_thread.run_sync(open_registry, settings, base)
    stack.push_async_callback(anyio.to_thread.run_sync, registry.close)
    view = await anyio.to_thread.run_sync(RegistryView.over, registry)
    frontiers = {name: Frontier(config, transport=transport) for name, config in policy.frontiers.items()}
    for frontier in frontiers.values():
        frontier.tracing = tracing
        stack.push_async_callback(frontier.aclose)
    meter = PromptMeter(base_model_dir(settings, pool.first.replica))
    embedder = Embedder(lazy=True)  # one model for the auto router and the RAG path, loaded on first use
    rag = RagTarget(
        await anyio.to_thread.run_sync(lambda: RagPath(open_index(index_url(settings)), embedder, meter.count_text))
    )
    stack.push_async_callback(anyio.to_thread.run_sync, rag.rag.close)
    await rag.refresh()
    merged = MergedDeployments(
        lambda: view.catalog, metrics, lambda url: _replica(settings, url, "merged", transport, tracing)
    )
    stack.push_async_callback(merged.aclose)
    router = Router(
        pool,
        lambda: view.catalog,
        settings.base_model,
        policy=policy,
        frontiers=frontiers,
        collections=rag,
        auto=SemanticRouter(policy.auto.threshold, embedder),
        merged=merged,
    )
    usage = UsageMeter(view)
    stack.push_async_callback(_last_usage, usage)  # before the registry, whose database it is written to
    proxy = Proxy(router, metrics, meter, rag, usage)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    auth = Authenticator(lambda: view.keys, admin_key)
    if auth.open:
        log.warning(
            "no API keys configured: the gateway is open, to clients on loopback only; create a key with "
            "`quiver keys create --tenant NAME --scope inference` (or set QUIVER_ADMIN_KEY) to serve others"
        )
    limiter = RateLimiter.create(settings.redis_url, metrics)
    stack.push_async_callback(limiter.aclose)
    uploads = UploadSlots(settings.max_concurrent_uploads)
    return Gateway(
        settings, metrics, pool, view, router, proxy, frontiers, rag, merged, auth, usage, limiter, uploads, hints
    )


async def _last_usage(usage: UsageMeter) -> None:
    """Write the usage counted since the last flush, at shutdown: best effort, the database may be gone."""
    with suppress(Exception):
        await usage.flush()


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _replica(
    settings: Settings, url: str, name: str, transport: httpx.AsyncBaseTransport | None, tracing: Tracing
) -> VllmReplica:
    replica = VllmReplica(
        url,
        name=name,
        connect_timeout_s=settings.connect_timeout_s,
        request_timeout_s=settings.request_timeout_s,
        load_timeout_s=settings.adapter_load_timeout_s,
        unreachable_after_s=settings.unreachable_after_s,
        transport=transport,
    )
    replica.tracing = tracing
    return replica


def create_app(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, tracing: Tracing | None = None
) -> FastAPI:
    """Build the gateway app; tests may put an httpx MockTransport upstream and their own ``tracing``."""
    tracing = tracing or Tracing.to_collector(settings.otel_endpoint)
    access = AccessLog()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Whatever was started is stopped, in the reverse order, however far the start got.
        async with AsyncExitStack() as stack:
            stack.enter_context(access.running())
            gateway = app.state.gateway = await _build(settings, transport, tracing, stack)
            jobs = await fine_tuning.FineTuning.start(settings, base_model_dir(settings, gateway.replica))
            stack.push_async_callback(jobs.stop)
            app.state.fine_tuning = jobs
            # The first checks; the polls below take over after one interval.
            await asyncio.gather(gateway.pool.check(), gateway.merged.check())
            tasks = [
                asyncio.create_task(gateway.pool.watch(settings.health_interval_s), name="vllm-monitor"),
                asyncio.create_task(gateway.registry.watch(settings.registry_refresh_s), name="registry-refresh"),
                asyncio.create_task(gateway.rag.watch(settings.registry_refresh_s), name="rag-collections"),
                asyncio.create_task(gateway.merged.watch(settings.health_interval_s), name="merged-monitor"),
                asyncio.create_task(gateway.usage.watch(settings.usage_flush_s), name="usage-flush"),
            ]
            if gateway.hints is not None:
                tasks.append(asyncio.create_task(gateway.hints.watch(settings.health_interval_s), name="hints"))
            stack.push_async_callback(_cancelled, tasks)
            yield

    app = FastAPI(title="Quiver", version="0.1.0", lifespan=lifespan)
    # Inside RequestContext (added last, so outermost), which puts the request id on a 413 as on any answer.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, spooled=SPOOLED_UPLOADS)
    app.add_middleware(RequestContext, tracing=tracing, access=access)
    app.include_router(routes.router)
    app.include_router(admin.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)

    @app.exception_handler(QuiverError)
    async def _quiver_error(request: Request, exc: QuiverError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        error = QuiverError(str(exc.detail), code="not_found" if exc.status_code == 404 else "http_error")
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error"
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(QuiverError(f"internal error ({type(exc).__name__}); see the gateway log"))

    return app


def server_config(app: FastAPI, settings: Settings, **options: Any) -> uvicorn.Config:
    """How uvicorn serves a gateway app: on the settings' host and port, ``options`` on top. uvicorn's own access
    log stays off whatever the options say: the gateway writes one line per request, with its request id."""
    given: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    return uvicorn.Config(app, **(given | options | {"access_log": False}))
