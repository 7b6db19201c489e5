"""Upstream logic with httpx MockTransport: error mapping, single loads, LRU, usage parsing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from adapters import AdapterVersion
from core.errors import InvalidRequest, Unavailable, UpstreamError, UpstreamTimeout
from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.serving import usage_of
from gateway.settings import Settings
from gateway.upstream import VllmReplica


def version(name: str, number: int = 1) -> AdapterVersion:
    return AdapterVersion(
        name=name,
        number=number,
        sha256="0" * 64,
        path=Path(f"/store/{name}/{number}"),
        rank=8,
        target_modules=("q_proj",),
        size_bytes=1,
        created_at=datetime.now(UTC),
    )


class FakeVllm:
    """An OpenAI-shaped upstream that records LoRA calls; loads take a moment, as in vLLM."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloads: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        if request.url.path == "/v1/load_lora_adapter":
            await asyncio.sleep(0.05)
            self.loads.append(json.loads(request.content)["lora_name"])
            return httpx.Response(200, text="ok")
        if request.url.path == "/v1/unload_lora_adapter":
            self.unloads.append(json.loads(request.content)["lora_name"])
            return httpx.Response(200, text="ok")
        return httpx.Response(404)


def residency(capacity: int = 2) -> tuple[Residency, FakeVllm]:
    fake = FakeVllm()
    replica = VllmReplica("http://vllm", transport=httpx.MockTransport(fake))
    return Residency(replica, capacity, Metrics()), fake


async def test_concurrent_first_uses_make_one_load() -> None:
    res, fake = residency()
    await asyncio.gather(*(res.ensure_loaded(version("a")) for _ in range(20)))
    assert fake.loads == ["a@v1"]


async def test_lru_evicts_least_recently_used() -> None:
    res, fake = residency(capacity=2)
    for name in ("a", "b"):
        await res.ensure_loaded(version(name))
    async with res.lease(version("a")):  # touching a makes b the least recently used
        pass
    await res.ensure_loaded(version("c"))
    assert fake.unloads == ["b@v1"]
    assert res.loaded == ["a@v1", "c@v1"]


async def test_adapter_with_requests_in_flight_is_never_evicted() -> None:
    res, fake = residency(capacity=1)
    res.slot_wait_s = 0.05
    async with res.lease(version("a")):
        with pytest.raises(Unavailable) as caught:
            await res.ensure_loaded(version("b"))
        assert caught.value.retry_after and caught.value.code == "adapter_slots_busy"
    await res.ensure_loaded(version("b"))
    assert fake.unloads == ["a@v1"]


async def test_a_load_waits_for_a_busy_slot_to_free_up() -> None:
    res, fake = residency(capacity=1)
    lease = res.lease(version("a"))
    await lease.__aenter__()
    waiting = asyncio.create_task(res.ensure_loaded(version("b")))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "b waits while a serves its request"
    await lease.__aexit__(None, None, None)
    await waiting
    assert fake.unloads == ["a@v1"] and res.loaded == ["b@v1"]


async def test_reconcile_forgets_what_a_restarted_vllm_lost() -> None:
    res, _ = residency()
    await res.ensure_loaded(version("a"))
    res.reconcile(present=set(), polled_since=float("inf"))
    assert res.loaded == []


def _replica(handler: httpx.MockTransport) -> VllmReplica:
    return VllmReplica("http://vllm", transport=handler)


@pytest.mark.parametrize(
    ("exc", "expected", "status"),
    [
        (httpx.ConnectError("refused"), Unavailable, 503),
        (httpx.ReadTimeout("slow"), UpstreamTimeout, 504),
        (httpx.RemoteProtocolError("garbage"), UpstreamError, 502),
    ],
)
async def test_transport_failures_map_to_status(exc: Exception, expected: type, status: int) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(expected) as caught:
        await _replica(httpx.MockTransport(fail)).open("/v1/chat/completions", b"{}")
    assert caught.value.status_code == status


async def test_upstream_4xx_keeps_status_and_message() -> None:
    body = {
        "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens", "code": 400}
    }
    replica = _replica(httpx.MockTransport(lambda r: httpx.Response(400, json=body)))
    with pytest.raises(InvalidRequest) as caught:
        await replica.open("/v1/chat/completions", b"{}")
    assert caught.value.status_code == 400 and caught.value.param == "max_tokens"
    assert "too large" in caught.value.message


class HoldsAlready:
    """A vLLM that already holds ``a`` (loaded from ``root``) and records what it is asked."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/v1/models":
            data = [{"id": "m", "parent": None}, {"id": "a", "root": self.root, "parent": "m"}]
            return httpx.Response(200, json={"data": data})
        if request.url.path == "/v1/load_lora_adapter" and self.calls.count(request.url.path) == 1:
            return httpx.Response(400, json={"error": {"message": "The lora adapter 'a' has already been loaded."}})
        return httpx.Response(200, text="ok")


async def test_load_of_a_name_already_held_from_the_same_directory_is_success() -> None:
    fake = HoldsAlready("/store/a/1")
    await _replica(httpx.MockTransport(fake)).load_adapter("a", "/store/a/1")
    assert fake.calls == ["/v1/load_lora_adapter", "/v1/models"]


async def test_a_name_held_from_another_directory_is_replaced() -> None:
    fake = HoldsAlready("/old-store/a/1")
    await _replica(httpx.MockTransport(fake)).load_adapter("a", "/store/a/1")
    assert fake.calls == ["/v1/load_lora_adapter", "/v1/models", "/v1/unload_lora_adapter", "/v1/load_lora_adapter"]


def test_usage_is_read_from_the_tail() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    assert usage_of(stream) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert usage_of(b'data: {"choices":[]}\n\n') is None
    assert usage_of(b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}') == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
    }
    assert usage_of(b'data: {"choices":[],"usage":null}\n\n') is None


def test_settings_fail_fast_with_clear_messages(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="QUIVER_MAX_LORA_RANK must be one of"):
        Settings(max_lora_rank=12)
    with pytest.raises(ValidationError, match="must start with http"):
        Settings(vllm_url="localhost:8001")
    with pytest.raises(ValidationError, match="has no config.json"):
        Settings(base_model_path=tmp_path)
    settings = Settings(data_dir=tmp_path)
    assert settings.registry_url == f"sqlite:///{tmp_path / 'registry.db'}"


async def test_dropped_pooled_connections_are_sent_again_then_reported_as_unavailable() -> None:
    failures: list[Exception] = [httpx.ReadError("reset")] * 4

    def flaky(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop(0)
        return httpx.Response(200, json={"ok": True})

    replica = VllmReplica("http://vllm", transport=httpx.MockTransport(flaky))
    with pytest.raises(Unavailable, match="closed the connection"):  # every try dropped: the upstream is going
        await replica.open("/v1/chat/completions", b"{}")
    failures.extend([httpx.RemoteProtocolError("peer closed")] * 4)
    with pytest.raises(UpstreamError, match="RemoteProtocolError"):
        await replica.open("/v1/chat/completions", b"{}")
    failures.append(httpx.ReadError("reset"))
    answered = await replica.open("/v1/chat/completions", b"{}")  # one dead connection: sent again, answered
    assert answered.status_code == 200
    await replica.aclose()
