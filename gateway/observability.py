"""Request ids, structured logs and OpenTelemetry traces.

Every request gets an id: the client's ``x-request-id`` when it is sane, else a new one. It is echoed
on the response (errors and streams included), sent to vLLM, and on every log record made while the
request runs. Each request but the probes' (``/health``, ``/metrics``) makes one access line on
``quiver.access``, with its id, status and duration; a thread writes it, never the event loop (uvicorn's
own access log is off). Logs are JSON lines with ``QUIVER_LOG_FORMAT=json``. Traces are off unless
``QUIVER_OTEL_ENDPOINT`` names an OTLP/HTTP collector: then each request is a server span, each call
to an upstream a client span whose W3C ``traceparent`` goes with the request, so vLLM's own spans
(``--otlp-traces-endpoint``) join the gateway's trace.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import re
import sys
import time
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("quiver_request_id", default=None)
log = logging.getLogger("quiver.access")


class _RequestIdFilter(logging.Filter):
    """Puts the running request's id on every record (``-`` outside requests) that does not carry one yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # access lines bring theirs: they are written outside the request
            record.request_id = request_id.get() or "-"
        return True


def configure_logging(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Send every logger (uvicorn's included, but its access log) to ``stream`` (stderr) as JSON lines or as text,
    with request ids."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s [%(request_id)s] %(message)s"))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The gateway writes one access line per request (``AccessLog``). uvicorn writes its own whenever its access
    # logger has a handler, its own or an ancestor's: with none, it writes nothing, whatever its config said.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    # One line per health poll would drown what matters.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _ToLogger(QueueListener):
    """Hands each queued record to ``logger``, whose handlers (and its ancestors') write it in the listener's thread."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], logger: logging.Logger) -> None:
        super().__init__(records)
        self._logger = logger

    def handle(self, record: logging.LogRecord) -> None:
        self._logger.handle(record)


class AccessLog:
    """One line per request on ``quiver.access``, written by a thread: a request only puts its record on a queue,
    so a slow log sink (a full pipe, a network handler) never holds up the event loop. Runs with the app's lifespan.
    """

    def __init__(self) -> None:
        self._records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._queued = QueueHandler(self._records)
        self._listener = _ToLogger(self._records, log)
        self._running = False

    @contextmanager
    def running(self) -> Iterator[None]:
        """Write queued lines while the block runs; those still queued at its end are written before it returns."""
        self._listener.start()
        self._running = True
        try:
            yield
        finally:
            self._running = False
            self._listener.stop()

    def write(self, method: str, path: str, status: int, duration_ms: float, rid: str) -> None:
        """The access line of one request."""
        if not log.isEnabledFor(logging.INFO):
            return
        extra = {"status": status, "duration_ms": duration_ms, "request_id": rid}
        record = log.makeRecord(
            log.name, logging.INFO, __file__, 0, "%s %s %d", (method, path, status), None, None, extra
        )
        # Outside a lifespan (an app used without one) there is no thread to write it: written here, then.
        (self._queued if self._running else log).handle(record)


class Tracing:
    """OpenTelemetry spans for requests and upstream calls; every method is a no-op while tracing is off."""

    def __init__(self, tracer: Any = None) -> None:
        self._tracer = tracer

    @classmethod
    def to_collector(cls, endpoint: str | None, service: str = "quiver-gateway") -> Tracing:
        """Export to the OTLP/HTTP collector at ``endpoint`` (``http://host:4318``); off when None."""
        if not endpoint:
            return cls()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
        return cls(provider.get_tracer("quiver.gateway"))

    @property
    def on(self) -> bool:
        return self._tracer is not None

    @contextmanager
    def server_span(self, scope: Scope) -> Iterator[Any]:
        """The span of one incoming request, continuing the client's trace if it sent a ``traceparent``."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry import propagate, trace

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        name = f"{scope.get('method', 'GET')} {scope.get('path', '')}"
        with self._tracer.start_as_current_span(
            name, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute("http.request.method", scope.get("method", ""))
            span.set_attribute("url.path", scope.get("path", ""))
            yield span

    @contextmanager
    def client_span(self, name: str, headers: MutableMapping[str, str], **attributes: str) -> Iterator[None]:
        """A span around one upstream call; its ``traceparent`` is written into ``headers``."""
        if self._tracer is None:
            yield
            return
        from opentelemetry import propagate, trace

        with self._tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
            for key, value in attributes.items():
                span.set_attribute(key, value)
            propagate.inject(headers)
            yield


def outbound_headers() -> dict[str, str]:
    """Headers every upstream call carries: the request id (vLLM uses it as its own request id)."""
    current = request_id.get()
    return {REQUEST_ID: current} if current else {}


class RequestContext:
    """ASGI middleware: the request id (taken or made, echoed, bound to logs), the server span, the access line.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which buffers streams and costs a task per request.
    """

    def __init__(self, app: ASGIApp, tracing: Tracing, access: AccessLog) -> None:
        self.app = app
        self.tracing = tracing
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = given if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            with self.tracing.server_span(scope) as span:
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    if span is not None:
                        span.set_attribute("http.response.status_code", status)
        finally:
            path = scope.get("path", "")
            if path not in ("/health", "/metrics"):
                duration_ms = round(1000 * (time.perf_counter() - started), 2)
                self.access.write(scope.get("method", ""), path, status, duration_ms, rid)
            request_id.reset(token)
