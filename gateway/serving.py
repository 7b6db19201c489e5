"""Serving a generation request: plan it, then walk the plan; for each target, prepare the body (context check,
RAG), open the upstream request (on a replica, under the member's lease), and reply, plain or streamed.

The upstream's answer is passed through as bytes: a non-streamed body is returned as read, and a
stream is relayed chunk by chunk as it arrives, never parsed and re-serialized. Only the ``usage``
object is read out of the tail for the token metrics.

Fallback: a target that fails before anything reached the client (including a stream's first
chunk, which is read before the response starts) hands the request to the next step of the plan.
Once bytes went out, or when the failure is the client's own (a 4xx), nothing is retried.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from core.errors import InvalidRequest, QuiverError, Unavailable, UpstreamTimeout
from gateway.auth import OPEN, Principal
from gateway.metrics import Metrics
from gateway.router import (
    AdapterOnReplica,
    OnFrontier,
    Plan,
    RagOnReplica,
    Router,
    RouteRequest,
    Skipped,
    Target,
)
from gateway.tokens import Prompt, PromptMeter
from gateway.upstream import unreachable
from gateway.usage import UsageMeter

log = logging.getLogger("quiver.serving")

SERVED_BY = "x-quiver-served-by"
FALLBACK_REASON = "x-quiver-fallback-reason"
ROUTE = "x-quiver-route"
REPLICA = "x-quiver-replica"
SOURCES = "x-quiver-sources"
_USAGE_KEY = b'"usage"'
_DECODER = json.JSONDecoder()
# The parameters that reserve completion tokens, in the order the upstream reads them (tokens.completion_budget).
_BUDGETS = ("max_completion_tokens", "max_tokens")
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


class _TargetFailed(Exception):
    """A target could not answer, for a fallback ``reason``; ``error`` is what the client sees if none can."""

    def __init__(self, reason: str, error: QuiverError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def fallback_reason(exc: QuiverError) -> str:
    """The fallback reason a target's failure stands for."""
    if isinstance(exc, UpstreamTimeout):
        return "upstream_timeout"
    if unreachable(exc):
        return "upstream_down"
    if isinstance(exc, Unavailable):
        return "overloaded"
    return "upstream_error"


def route_request(payload: dict[str, Any], headers: Mapping[str, str], principal: Principal = OPEN) -> RouteRequest:
    """What the router needs from a request body, its headers and its caller."""
    metadata = payload.get("metadata")
    prompt = ""
    messages = payload.get("messages")
    if isinstance(messages, list):
        user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        content = user[-1].get("content") if user else None
        prompt = content if isinstance(content, str) else ""
    elif isinstance(payload.get("prompt"), str):
        prompt = payload["prompt"]
    return RouteRequest(
        model=str(payload["model"]),
        headers=headers,
        metadata=metadata if isinstance(metadata, dict) else {},
        prompt=prompt,
        principal=principal,
    )


class RagPrompts(Protocol):
    """Turns a request into its retrieval-augmented form (``rag:COLLECTION`` targets)."""

    async def augment(
        self, collection: str, payload: dict[str, Any], context_tokens: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]: ...


@dataclass(frozen=True)
class Generation:
    """One generation request on its way: the endpoint, the body, the caller, its prompt's counts, when it began."""

    endpoint: str
    payload: dict[str, Any]
    stream: bool
    principal: Principal
    prompt: Prompt
    started: float = field(default_factory=time.perf_counter)


Sources = list[dict[str, Any]] | None


class Proxy:
    """Plans generation requests and serves them along their plan."""

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        meter: PromptMeter,
        rag: RagPrompts | None = None,
        usage: UsageMeter | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.meter = meter
        self.rag = rag
        self.usage = usage

    def request(self, endpoint: str, payload: dict[str, Any], stream: bool, principal: Principal = OPEN) -> Generation:
        """A request to plan and serve; its clock starts now."""
        return Generation(endpoint, payload, stream, principal, self.meter.prompt(payload))

    async def plan(self, request: Generation, headers: Mapping[str, str] | None = None) -> Plan:
        """The request's plan; a request that has none (its model is unknown) is counted before the error is raised."""
        try:
            plan = await self.router.plan(route_request(request.payload, headers or {}, request.principal))
        except QuiverError as exc:
            # Unknown model strings are labelled "unknown" so a client cannot blow up label cardinality.
            self._observe_failure(request, "unknown", exc.status_code)
            raise
        self.metrics.overhead.observe(time.perf_counter() - request.started)
        return plan

    async def serve(self, plan: Plan, request: Generation) -> Response:
        """The answer of the first step of ``plan`` that can give one; raises a QuiverError when none could."""
        try:
            return await self._first_answer(plan, request)
        except QuiverError as exc:
            self._observe_failure(request, plan.model, exc.status_code)
            raise

    async def _first_answer(self, plan: Plan, request: Generation) -> Response:
        reason: str | None = None
        last: QuiverError | None = None
        for step in plan.steps:
            if isinstance(step, Skipped):
                reason, last = reason or step.reason, step.error
                continue
            try:
                response = await self._attempt(step, plan, request)
            except _TargetFailed as failed:
                log.info("%s could not answer %s (%s): %s", step.served_by, plan.model, failed.reason, failed.error)
                reason, last = reason or failed.reason, failed.error
                continue
            if reason is not None:
                response.headers[FALLBACK_REASON] = reason
                self.metrics.fallbacks.labels(reason, step.served_by).inc()
            return response
        assert last is not None
        raise last

    async def _attempt(self, target: Target, plan: Plan, request: Generation) -> Response:
        """``target``'s answer; _TargetFailed when it cannot give one before anything reached the client."""
        body, sources = await self._prepare(target, plan, request)
        held = AsyncExitStack()  # what the answer holds (the lease, the upstream response) until it is relayed
        try:
            upstream = await self._open(target, request.endpoint, body, held)
            reply = self._streamed if request.stream else self._plain
            return await reply(target, plan, request, upstream, held, sources)
        except InvalidRequest:
            await held.aclose()
            raise  # the client's own mistake: no other target would take it better
        except QuiverError as exc:
            await held.aclose()
            raise _TargetFailed(fallback_reason(exc), exc) from exc
        except BaseException:
            await held.aclose()
            raise

    async def _prepare(self, target: Target, plan: Plan, request: Generation) -> tuple[bytes, Sources]:
        """The body for ``target``: checked against its context, augmented from its collection (RAG), under the
        upstream's name for the model; and the sources retrieved, if any."""
        payload = dict(request.payload)
        context = target.context_tokens
        overflow = await request.prompt.overflow(context, frontier=isinstance(target, OnFrontier))
        if context is not None and overflow is not None:
            raise _TargetFailed("context_length", _too_long(payload, context, plan.model, overflow))
        sources: Sources = None
        if isinstance(target, RagOnReplica):
            assert self.rag is not None  # the router only plans RAG targets when there are collections
            try:
                payload, sources = await self.rag.augment(target.collection, payload, context)
            except InvalidRequest:
                raise
            except QuiverError as exc:
                # No embeddings (the export is missing) or no index: the collection cannot answer, the next step may.
                raise _TargetFailed(fallback_reason(exc), exc) from exc
        payload["model"] = target.upstream_model
        return json.dumps(payload, separators=(",", ":")).encode(), sources

    async def _open(self, target: Target, endpoint: str, body: bytes, held: AsyncExitStack) -> httpx.Response:
        """Send ``body`` upstream; to a replica under a lease on its member, which ``held`` releases."""
        member = target.member
        if member is None:
            return await target.upstream.open(endpoint, body)
        version = target.version if isinstance(target, AdapterOnReplica) else None
        try:
            lease = await held.enter_async_context(member.lease(version))
        except InvalidRequest:
            raise
        except QuiverError as exc:
            # Loading failed (vLLM refused the files, or no slot came free): the adapter cannot answer here.
            raise _TargetFailed("overloaded" if isinstance(exc, Unavailable) else "adapter_load_failed", exc) from exc
        return await lease.open(endpoint, body)

    async def _plain(
        self,
        target: Target,
        plan: Plan,
        request: Generation,
        upstream: httpx.Response,
        held: AsyncExitStack,
        sources: Sources,
    ) -> Response:
        """The whole answer, read before the client sees anything (``held`` is released once it is)."""
        try:
            content = await target.upstream.read(upstream)
        finally:
            await held.aclose()
        if sources is not None:
            content = _with_sources(content, sources)
        labels = (request.endpoint, plan.model, target.served_by)
        self._observe_success(labels, upstream.status_code, request, usage_of(content[-_TAIL_BYTES:]))
        media_type = upstream.headers.get("content-type", "application/json")
        headers = _headers(target, plan, sources)
        return Response(content, status_code=upstream.status_code, headers=headers, media_type=media_type)

    async def _streamed(
        self,
        target: Target,
        plan: Plan,
        request: Generation,
        upstream: httpx.Response,
        held: AsyncExitStack,
        sources: Sources,
    ) -> Response:
        """The answer relayed as it arrives (the stream takes ``held`` over); its first chunk is read before the
        response starts, so a failure up to it can still fall back."""
        chunks = target.upstream.relay(upstream)
        held.push_async_callback(chunks.aclose)
        first = await anext(chunks, b"")
        labels = (request.endpoint, plan.model, target.served_by)
        self.metrics.ttft.labels(*labels).observe(time.perf_counter() - request.started)
        return _HeldStream(
            self._relay(first, chunks, labels, request),
            held,
            status_code=upstream.status_code,
            headers=_headers(target, plan, sources) | {"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type="text/event-stream",
        )

    async def _relay(
        self, first: bytes, chunks: AsyncIterator[bytes], labels: tuple[str, str, str], request: Generation
    ) -> AsyncIterator[bytes]:
        tail = first[-_TAIL_BYTES:]
        status = 200
        try:
            if first:
                yield first
            async for chunk in chunks:
                tail = (tail + chunk)[-_TAIL_BYTES:]
                yield chunk
        except QuiverError as exc:
            # Bytes already went out, so the status cannot change; end the stream with an
            # OpenAI-style error event the client can read.
            status = exc.status_code
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        finally:
            self._observe_success(labels, status, request, usage_of(tail))

    def _observe_success(
        self, labels: tuple[str, str, str], status: int, request: Generation, usage: dict[str, Any] | None
    ) -> None:
        endpoint, model, adapter = labels
        self.metrics.requests.labels(endpoint, model, adapter, str(status)).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - request.started)
        counts = {"prompt": 0, "completion": 0}
        if usage:
            for kind in counts:
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int):
                    counts[kind] = count
                    self.metrics.tokens.labels(model, adapter, kind).inc(count)
        principal = request.principal
        self.metrics.observe_tenant(principal.tenant, adapter, status, counts["prompt"], counts["completion"])
        if self.usage is not None:
            self.usage.record(principal, adapter, status < 400, counts["prompt"], counts["completion"])

    def _observe_failure(self, request: Generation, model: str, status: int) -> None:
        # No target answered, so the request is counted against none.
        endpoint, served = request.endpoint, "none"
        self.metrics.requests.labels(endpoint, model, served, str(status)).inc()
        self.metrics.latency.labels(endpoint, model, served).observe(time.perf_counter() - request.started)
        self.metrics.observe_tenant(request.principal.tenant, served, status)
        if self.usage is not None:
            self.usage.record(request.principal, served, False, 0, 0)


def _headers(target: Target, plan: Plan, sources: Sources) -> dict[str, str]:
    """What the answer says about how it was served: by which target, on which route and replica, from which sources."""
    headers = {SERVED_BY: target.served_by, ROUTE: plan.route}
    if target.member is not None:
        headers[REPLICA] = target.member.name
    if sources is not None:
        headers[SOURCES] = json.dumps([_source_header(s) for s in sources], separators=(",", ":"))
    return headers


def _source_header(source: dict[str, Any]) -> dict[str, Any]:
    # Header values must stay small and ASCII: where each source came from, not its text.
    return {k: source[k] for k in ("index", "source", "location", "score") if k in source}


def _with_sources(content: bytes, sources: list[dict[str, Any]]) -> bytes:
    """A non-streamed answer with the retrieved sources added as a top-level ``sources`` field."""
    try:
        answer = json.loads(content)
    except ValueError:
        return content
    if not isinstance(answer, dict):
        return content
    answer["sources"] = sources
    return json.dumps(answer, separators=(",", ":")).encode()


def _too_long(payload: dict[str, Any], context: int, model: str, overflow: str) -> InvalidRequest:
    """The 400 for a request over ``context``: it names the completion budget when the prompt alone fits."""
    if overflow == "completion":
        budget = next((k for k in _BUDGETS if payload.get(k)), "max_tokens")
        message = f"{budget} {payload.get(budget)} plus the prompt is more than the {context}-token context"
        param = budget
    else:
        message = f"the prompt does not fit the {context}-token context"
        param = "messages" if "messages" in payload else "prompt"
    message += f" of any target that could answer '{model}'"
    return InvalidRequest(message, param=param, code="context_length_exceeded")
