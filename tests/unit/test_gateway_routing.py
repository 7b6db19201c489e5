"""Plans, placement and fallback rules with httpx MockTransport upstreams (vLLM and a frontier)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway import Settings, create_app
from gateway.health import ReplicaMonitor
from gateway.metrics import Metrics
from gateway.policy import RoutingPolicy
from gateway.pool import Member, ReplicaPool
from gateway.residency import Residency
from gateway.tokens import PromptMeter
from gateway.upstream import VllmReplica
from tests.unit.test_gateway_app import COMPLETION, _client
from tests.unit.test_gateway_upstream import FakeVllm, version

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
MODELS = {"data": [{"id": "m", "root": "/m", "parent": None, "max_model_len": 2048}]}


class _BreaksAfterOneChunk(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"Par"}}]}\n\n'
        raise httpx.ReadError("connection reset mid-stream")


class Upstreams:
    """vLLM at http://vllm and a frontier at http://frontier, each answering as told."""

    def __init__(self) -> None:
        self.vllm: list[httpx.Response] = []
        self.frontier: list[httpx.Response] = []
        self.frontier_calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.host == "frontier":
            self.frontier_calls += 1
            if self.frontier:
                return self.frontier.pop(0)
            return httpx.Response(200, json=COMPLETION | {"model": json.loads(request.content)["model"]})
        return self.vllm.pop(0) if self.vllm else httpx.Response(200, json=COMPLETION)


def _settings(tmp_path: Path, routing: str) -> Settings:
    path = tmp_path / "routing.toml"
    path.write_text(
        'fallback = ["frontier:f"]\n[frontiers.f]\nbase_url = "http://frontier/v1"\n'
        'default_model = "big"\nmax_retry_wait_s = 5\n' + routing
    )
    return Settings(
        data_dir=tmp_path, vllm_url="http://vllm", base_model="m", health_interval_s=3600, routing_file=path
    )


async def test_a_stream_that_breaks_after_its_first_bytes_is_not_retried(tmp_path: Path) -> None:
    upstreams = Upstreams()
    upstreams.vllm.append(httpx.Response(200, stream=_BreaksAfterOneChunk()))
    async for client in _client(create_app(_settings(tmp_path, ""), transport=httpx.MockTransport(upstreams))):
        async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
            assert response.headers["x-quiver-served-by"] == "m"
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert "Par" in events[0]
        assert json.loads(events[-1][6:])["error"]["code"] == "upstream_error"
        assert upstreams.frontier_calls == 0


async def test_a_failure_before_the_first_byte_falls_back(tmp_path: Path) -> None:
    upstreams = Upstreams()
    upstreams.vllm.append(httpx.Response(500, json={"error": {"message": "engine died"}}))
    async for client in _client(create_app(_settings(tmp_path, ""), transport=httpx.MockTransport(upstreams))):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.headers["x-quiver-served-by"] == "frontier:f"
        assert response.headers["x-quiver-fallback-reason"] == "upstream_error"
        assert response.json()["model"] == "big", "the frontier gets its own name for the model"


async def test_the_clients_own_mistake_is_not_sent_down_the_chain(tmp_path: Path) -> None:
    upstreams = Upstreams()
    upstreams.vllm.append(httpx.Response(400, json={"error": {"message": "temperature must be >= 0"}}))
    async for client in _client(create_app(_settings(tmp_path, ""), transport=httpx.MockTransport(upstreams))):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 400
        assert upstreams.frontier_calls == 0


async def test_frontier_retries_a_short_retry_after_and_passes_on_a_long_one(tmp_path: Path) -> None:
    upstreams = Upstreams()
    upstreams.frontier += [httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow"}})]
    app = create_app(_settings(tmp_path, ""), transport=httpx.MockTransport(upstreams))
    async for client in _client(app):
        retried = await client.post("/v1/chat/completions", json=CHAT | {"model": "frontier:f"})
        assert retried.status_code == 200 and upstreams.frontier_calls == 2
        upstreams.frontier += [httpx.Response(429, headers={"retry-after": "60"}, json={"error": {"message": "x"}})]
        # Not worth waiting for: the plan has no other target, so the client gets the frontier's Retry-After.
        passed_on = await client.post("/v1/chat/completions", json=CHAT | {"model": "frontier:f"})
        assert passed_on.status_code == 503 and passed_on.headers["retry-after"] == "60"
        assert upstreams.frontier_calls == 3


def test_routing_file_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "routing.toml"
    path.write_text('fallback = ["frontier:nope"]\n[frontiers.f]\nbase_url = "ftp://x"\n')
    with pytest.raises(ValueError, match="frontiers.f.base_url"):
        RoutingPolicy.load(path)
    path.write_text('fallback = ["frontier:nope"]\n')
    with pytest.raises(ValueError, match="names no configured frontier"):
        RoutingPolicy.load(path)
    path.write_text("[[rules]]\nname = 1\n")
    with pytest.raises(ValueError, match="rules.0"):
        RoutingPolicy.load(path)


def _pool(n: int, *, saturation: int = 2, max_in_flight: int = 4, capacity: int = 2) -> ReplicaPool:
    members = []
    metrics = Metrics()
    for i in range(n):
        replica = VllmReplica(f"http://vllm{i}", name=f"r{i}", transport=httpx.MockTransport(FakeVllm()))
        replica.state = "up"
        residency = Residency(replica, capacity, metrics)
        members.append(Member(replica, residency, ReplicaMonitor(replica, residency, metrics)))
    return ReplicaPool(members, saturation=saturation, max_in_flight=max_in_flight)


async def test_placement_prefers_the_replica_holding_the_adapter_until_it_saturates() -> None:
    pool = _pool(2)
    r0, r1 = pool.members
    await r1.residency.ensure_loaded(version("a"))
    r1.in_flight = 1
    assert [m.name for m in pool.place("a@v1")] == ["r1", "r0"], "affinity beats a less busy replica"
    r1.in_flight = 2  # saturated: a replica with a free slot comes first
    assert [m.name for m in pool.place("a@v1")] == ["r0", "r1"]
    r0.in_flight = 4  # r0 is over its limit: not a candidate at all
    assert [m.name for m in pool.place("a@v1")] == ["r1"]
    r1.in_flight = 4
    assert pool.place("a@v1") == [] and pool.why_empty() == "overloaded"
    r0.replica.state = r1.replica.state = "down"
    assert pool.why_empty() == "no_healthy_replica"


def test_base_requests_go_to_the_least_busy_replica() -> None:
    pool = _pool(3)
    for member, load in zip(pool.members, (3, 1, 2), strict=True):
        member.in_flight = load
    assert [m.name for m in pool.place(None)] == ["r1", "r2", "r0"]


async def test_prompt_meter_counts_with_the_base_tokenizer_only_past_the_bound(base_model_dir: Path) -> None:
    meter = PromptMeter(base_model_dir)
    short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    assert PromptMeter.bound(short) < 2048 and await meter.fits(short, 2048, frontier=False)
    long = {"messages": [{"role": "user", "content": "word " * 1000}], "max_tokens": 100}
    assert PromptMeter.bound(long) > 1000
    # About 1,000 tokens of prompt: fits 2048 with 100 to generate, not 1024.
    assert await meter.fits(long, 2048, frontier=False)
    assert not await meter.fits(long, 1024, frontier=False)
    assert not await meter.fits(long, 1024, frontier=True)  # tiktoken's count for frontier models
    assert await meter.fits(long, None, frontier=False), "an unknown context window is not checked"
