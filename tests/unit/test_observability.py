"""Request ids, JSON logs, OpenTelemetry traces and the per-tenant metrics, through the app (MockTransport upstream)."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from core.processes import free_port
from gateway import create_app
from gateway.observability import Tracing, configure_logging
from tests.servers import GatewayServer
from tests.unit.test_access import CHAT, _client
from tests.unit.test_gateway_app import COMPLETION, _settings


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


class RecordingVllm:
    """Answers like vLLM and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "root": "/m", "parent": None}]})
        if json.loads(request.content).get("stream"):
            chunks = [b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n', b"data: [DONE]\n\n"]
            return httpx.Response(200, stream=_Chunks(chunks), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=COMPLETION | {"model": "m"})

    def generations(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/v1/chat/completions"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_request_ids_are_echoed_made_and_forwarded(tmp_path: Path) -> None:
    fake = RecordingVllm()
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(fake))
    async for client in _client(app):
        given = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers={"x-request-id": "abc-1"})
        assert given.headers["x-request-id"] == "abc-1"
        assert fake.generations()[-1].headers["x-request-id"] == "abc-1"

        made = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"})
        assert len(made.headers["x-request-id"]) == 32
        assert fake.generations()[-1].headers["x-request-id"] == made.headers["x-request-id"]

        hostile = await client.get("/v1/models/nope", headers={"x-request-id": "bad id\twith spaces"})
        assert hostile.status_code == 404 and hostile.headers["x-request-id"] != "bad id\twith spaces"

        async with client.stream(
            "POST", "/v1/chat/completions", json=CHAT | {"model": "m", "stream": True}, headers={"x-request-id": "s-2"}
        ) as streamed:
            assert streamed.headers["x-request-id"] == "s-2"
            assert b"[DONE]" in b"".join([chunk async for chunk in streamed.aiter_bytes()])


async def test_json_logs_carry_the_request_id(tmp_path: Path, restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RecordingVllm()))
    async for client in _client(app):
        await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers={"x-request-id": "log-7"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "quiver.access" and line["request_id"] == "log-7"]
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["level"] == "INFO" and access[0]["duration_ms"] >= 0
    assert {"time", "message"} <= access[0].keys()


class _Threads(logging.Handler):
    """Notes the request id of each record it writes, and the thread that wrote it."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.written.append((getattr(record, "request_id", "-"), threading.current_thread().name))


async def test_access_lines_are_written_by_a_thread_not_the_event_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quiver.access")
    threads = _Threads()
    access = logging.getLogger("quiver.access")
    access.addHandler(threads)
    try:
        app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RecordingVllm()))
        async for client in _client(app):
            for rid in ("t-1", "t-2"):
                await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers={"x-request-id": rid})
            loop_thread = threading.current_thread().name
    finally:
        access.removeHandler(threads)
    # Both written by the time the lifespan ended, neither on the event loop's thread.
    assert [rid for rid, _ in threads.written] == ["t-1", "t-2"]
    assert all(thread != loop_thread for _, thread in threads.written)


def test_a_served_request_makes_one_access_line_and_none_from_uvicorn(tmp_path: Path, restore_logging: None) -> None:
    out = io.StringIO()
    # No vLLM behind it: the models list needs none. uvicorn logs at info, as `quiver up` runs it.
    server = GatewayServer(_settings(tmp_path, vllm_url=f"http://127.0.0.1:{free_port()}"), log_level="info")
    configure_logging("json", "info", stream=out)  # after uvicorn configured its loggers, as `quiver up` does
    server.start()
    try:
        answer = httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "one-line"})
        assert answer.status_code == 200
    finally:
        server.stop()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "one-line"]
    assert [(line["logger"], line["message"], line.get("status")) for line in mine] == [
        ("quiver.access", "GET /v1/models 200", 200)
    ]
    assert [line for line in lines if line["logger"] == "uvicorn.access"] == []
    assert any(line["logger"] == "uvicorn.error" for line in lines), "uvicorn's own lines still reach the log"


async def test_traces_cross_from_the_gateway_to_the_upstream(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fake = RecordingVllm()
    tracing = Tracing(provider.get_tracer("test"))
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(fake), tracing=tracing)
    client_trace = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{client_trace}-b7ad6b7169203331-01"
    async for client in _client(app):
        answer = await client.post(
            "/v1/chat/completions", json=CHAT | {"model": "m"}, headers={"traceparent": traceparent}
        )
        assert answer.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server, upstream = spans["POST /v1/chat/completions"], spans["upstream POST /v1/chat/completions"]
    # The client's trace continues through the gateway to vLLM, whose request carries the upstream span's context.
    assert f"{server.context.trace_id:032x}" == client_trace == f"{upstream.context.trace_id:032x}"
    assert upstream.parent.span_id == server.context.span_id
    sent = fake.generations()[-1].headers["traceparent"]
    assert sent.split("-")[1:3] == [client_trace, f"{upstream.context.span_id:016x}"]
    assert server.attributes["http.response.status_code"] == 200


async def test_without_tracing_nothing_is_injected_and_tenants_are_counted(tmp_path: Path) -> None:
    fake = RecordingVllm()
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(fake))
    async for client in _client(app):
        await client.post("/v1/chat/completions", json=CHAT | {"model": "m"})
        await client.post("/v1/chat/completions", json=CHAT | {"model": "nope"})
        assert "traceparent" not in fake.generations()[-1].headers
        metrics = app.state.gateway.metrics.registry
        labels = {"tenant": "open", "target": "base", "status": "200"}
        assert metrics.get_sample_value("quiver_tenant_requests_total", labels) == 1
        prompt = {"tenant": "open", "target": "base", "kind": "prompt"}
        assert metrics.get_sample_value("quiver_tenant_tokens_total", prompt) == 2
        missing = {"tenant": "open", "target": "none", "status": "404"}
        assert metrics.get_sample_value("quiver_tenant_requests_total", missing) == 1
        assert metrics.get_sample_value("quiver_gateway_overhead_seconds_count", {}) == 1
