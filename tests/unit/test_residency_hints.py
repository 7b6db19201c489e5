"""Residency hints on a real Redis: two gateways' LRUs over one replica agree on what was used last."""

from __future__ import annotations

import httpx

from gateway.hints import ResidencyHints
from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.upstream import VllmReplica
from tests.redis import RedisServer, redis_server  # noqa: F401 - a fixture, used by name
from tests.unit.test_gateway_upstream import FakeVllm, version


def gateway_residency(fake: FakeVllm, hints: ResidencyHints | None) -> Residency:
    replica = VllmReplica("http://vllm", transport=httpx.MockTransport(fake))
    return Residency(replica, 2, Metrics(), hints=hints)


async def test_one_gateway_does_not_evict_what_another_gateway_uses(redis_server: RedisServer) -> None:  # noqa: F811
    fake = FakeVllm()
    first = gateway_residency(fake, ResidencyHints.from_url(redis_server.url))
    second = gateway_residency(fake, ResidencyHints.from_url(redis_server.url))
    try:
        for name in ("hot", "cold"):  # the first gateway loads both; its LRU order: hot, then cold
            async with first.lease(version(name)):
                pass
        # The second gateway keeps using "hot"; the first never sees those requests.
        async with second.lease(version("hot")):
            pass
        await second.hints.flush()  # type: ignore[union-attr]
        await first.ensure_loaded(version("new"))
        assert fake.unloads == ["cold@v1"], "without hints the first gateway would unload hot@v1"
        assert first.loaded == ["hot@v1", "new@v1"]
    finally:
        for residency in (first, second):
            await residency.hints.aclose()  # type: ignore[union-attr]


async def test_without_redis_each_gateway_keeps_its_own_lru() -> None:
    fake = FakeVllm()
    hints = ResidencyHints.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    alone = gateway_residency(fake, hints)
    for name in ("a", "b"):
        async with alone.lease(version(name)):
            pass
    await alone.ensure_loaded(version("c"))
    assert fake.unloads == ["a@v1"]
    await hints.aclose()  # the uses it could not send are dropped, with a log line
