"""Serving a generation request: walk the plan, hold the adapter loaded, relay vLLM's bytes.

vLLM's answer is passed through as bytes: a non-streamed body is returned as read, and a stream
is relayed chunk by chunk as it arrives, never parsed and re-serialized. Only the ``usage`` object
is read out of the tail for the token metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.router import AdapterOnReplica, Plan, Router, Target
from quiver.errors import InvalidRequest, QuiverError, Unavailable, UpstreamError

SERVED_BY = "x-quiver-served-by"
_USAGE_KEY = b'"usage"'
_DECODER = json.JSONDecoder()
# Bytes of a stream's tail kept to find the final usage chunk.
_TAIL_BYTES = 4096


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The last ``usage`` object in an OpenAI answer or SSE stream tail, if there is one."""
    start = body.rfind(_USAGE_KEY)
    if start < 0:
        return None
    text = body[start + len(_USAGE_KEY) :].decode("utf-8", "replace").lstrip(" :\t\r\n")
    try:
        usage, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None


class _HeldStream(StreamingResponse):
    """A stream that releases what it holds (adapter lease, upstream connection) however it ends.

    Starlette may never start the body iterator when the client leaves early, so the release
    cannot live in the iterator's ``finally`` alone.
    """

    def __init__(self, content: AsyncIterator[bytes], held: AsyncExitStack, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._held.aclose()


class Proxy:
    """Forwards OpenAI generation requests along their plan."""

    def __init__(self, router: Router, residency: Residency, metrics: Metrics) -> None:
        self.router = router
        self.residency = residency
        self.metrics = metrics

    async def generate(self, endpoint: str, payload: dict[str, Any], stream: bool) -> Response:
        """Answer one request; raises a QuiverError when no target could."""
        started = time.perf_counter()
        # Unknown model strings are labelled "unknown" so a client cannot blow up label cardinality.
        model, served = "unknown", "none"
        try:
            plan = self.router.plan(str(payload["model"]))
            model = plan.model
            response, served = await self._first_answer(plan, endpoint, payload, stream, started)
            return response
        except QuiverError as exc:
            self._observe_failure(endpoint, model, served, exc.status_code, started)
            raise

    async def _first_answer(
        self, plan: Plan, endpoint: str, payload: dict[str, Any], stream: bool, started: float
    ) -> tuple[Response, str]:
        last: QuiverError | None = None
        for target in plan.targets:
            try:
                return await self._attempt(target, plan, endpoint, payload, stream, started), target.served_by
            except (Unavailable, UpstreamError) as exc:
                # Nothing reached the client yet, so the next target may still answer.
                last = exc
        assert last is not None
        raise last

    async def _attempt(
        self, target: Target, plan: Plan, endpoint: str, payload: dict[str, Any], stream: bool, started: float
    ) -> Response:
        payload["model"] = target.upstream_model
        body = json.dumps(payload, separators=(",", ":")).encode()
        held = AsyncExitStack()
        try:
            upstream = await self._open(target, endpoint, body, held)
        except BaseException:
            await held.aclose()
            raise
        headers = {SERVED_BY: target.served_by}
        labels = (endpoint, plan.model, target.served_by)
        if not stream:
            try:
                content = await target.replica.read(upstream)
            finally:
                await held.aclose()
            self._observe_success(labels, upstream.status_code, started, usage_of(content[-_TAIL_BYTES:]))
            return Response(
                content,
                status_code=upstream.status_code,
                headers=headers,
                media_type=upstream.headers.get("content-type", "application/json"),
            )
        held.push_async_callback(upstream.aclose)
        return _HeldStream(
            self._relay(target, upstream, labels, started),
            held,
            status_code=upstream.status_code,
            headers=headers | {"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type="text/event-stream",
        )

    async def _open(self, target: Target, endpoint: str, body: bytes, held: AsyncExitStack) -> httpx.Response:
        if not isinstance(target, AdapterOnReplica):
            return await target.replica.open(endpoint, body)
        resident = await held.enter_async_context(self.residency.lease(target.version))
        generation = resident.generation
        try:
            return await target.replica.open(endpoint, body)
        except InvalidRequest as exc:
            if exc.status_code != 404:
                raise
        # vLLM no longer knows the adapter: it restarted since our last health poll. Load it
        # again and retry once; nothing has been sent to the client yet.
        await self.residency.reload(target.version, resident, generation)
        return await target.replica.open(endpoint, body)

    async def _relay(
        self, target: Target, upstream: httpx.Response, labels: tuple[str, str, str], started: float
    ) -> AsyncIterator[bytes]:
        tail = b""
        first = True
        status = upstream.status_code
        try:
            async for chunk in target.replica.relay(upstream):
                if first:
                    self.metrics.ttft.labels(*labels).observe(time.perf_counter() - started)
                    first = False
                tail = (tail + chunk)[-_TAIL_BYTES:]
                yield chunk
        except QuiverError as exc:
            # Bytes already went out, so the status cannot change; end the stream with an
            # OpenAI-style error event the client can read.
            status = exc.status_code
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        finally:
            self._observe_success(labels, status, started, usage_of(tail))

    def _observe_success(
        self, labels: tuple[str, str, str], status: int, started: float, usage: dict[str, Any] | None
    ) -> None:
        endpoint, model, adapter = labels
        self.metrics.requests.labels(endpoint, model, adapter, str(status)).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
        if usage:
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int):
                    self.metrics.tokens.labels(model, adapter, kind).inc(count)

    def _observe_failure(self, endpoint: str, model: str, served: str, status: int, started: float) -> None:
        self.metrics.requests.labels(endpoint, model, served, str(status)).inc()
        self.metrics.latency.labels(endpoint, model, served).observe(time.perf_counter() - started)
