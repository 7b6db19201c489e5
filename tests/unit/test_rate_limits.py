"""Per-minute request and token limits per key and tenant: 429s the OpenAI client understands, in-process
and shared through a real Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from access.keys import INFERENCE
from access.store import KeyStore
from adapters.db import Database
from core.errors import RateLimited
from gateway import create_app
from gateway.auth import Limits, Principal
from gateway.limits import RateLimiter, reset_text
from gateway.metrics import Metrics
from gateway.tokens import PromptMeter
from tests.redis import RedisServer, redis_server  # noqa: F401 - a fixture, used by name
from tests.unit.test_access import CHAT, _auth, _client
from tests.unit.test_gateway_app import RestartingVllm, _settings, keys_of
from tests.unit.test_gateway_routing import Upstreams
from tests.unit.test_gateway_routing import _settings as routing_settings


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (1.0, "1s"), (59.2, "1m0s"), (361, "6m1s")])
def test_resets_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


async def test_a_key_over_its_requests_per_minute_gets_429_with_the_headers_the_client_reads(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        with keys_of(app) as keys:
            token = keys.create_key("acme", [INFERENCE], requests_per_min=2).token
        await app.state.gateway.registry.refresh()
        body = CHAT | {"model": "m"}
        answers = [await client.post("/v1/chat/completions", json=body, headers=_auth(token)) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
        metric = app.state.gateway.metrics.registry.get_sample_value(
            "quiver_rate_limited_total", {"tenant": "acme", "limit": "key_requests"}
        )
        assert metric == 1

        sdk = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=token, http_client=client, max_retries=0)
        with pytest.raises(openai.RateLimitError, match="rate limit reached"):
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


async def test_a_tenants_token_limit_is_shared_by_its_keys_and_refusals_cost_nothing(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        with keys_of(app) as keys:
            first = keys.create_key("acme", [INFERENCE], requests_per_min=10).token
            second = keys.create_key("acme", [INFERENCE]).token
            keys.set_tenant_limits("acme", tokens_per_min=300)
        await app.state.gateway.registry.refresh()
        body = CHAT | {"model": "m", "max_tokens": 100}  # prompt bound 66 (no tokenizer here) + 100 = 166 tokens
        ok = await client.post("/v1/chat/completions", json=body, headers=_auth(first))
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-tokens"] == "134"
        refused = await client.post("/v1/chat/completions", json=body, headers=_auth(second))
        assert refused.status_code == 429 and "tenant tokens 300 per minute" in refused.json()["error"]["message"]
        refused = await client.post("/v1/chat/completions", json=body, headers=_auth(first))
        assert refused.status_code == 429
        # The refusals took nothing: the key's requests budget still has 9 of 10.
        small = await client.post(
            "/v1/chat/completions", json=CHAT | {"model": "m", "max_tokens": 1}, headers=_auth(first)
        )
        assert small.status_code == 200 and small.headers["x-ratelimit-remaining-requests"] == "8"
        huge = await client.post(
            "/v1/chat/completions", json=CHAT | {"model": "m", "max_tokens": 1000}, headers=_auth(first)
        )
        assert huge.status_code == 429 and "needs 1066 tokens" in huge.json()["error"]["message"]


async def test_two_gateways_share_a_limit_through_redis(redis_server: RedisServer) -> None:  # noqa: F811
    principal = Principal("k1", "acme", frozenset({INFERENCE}), key_limits=Limits(requests_per_min=3))
    gateways = [RateLimiter.create(redis_server.url, Metrics()) for _ in range(2)]
    prompt = PromptMeter(None).prompt({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    admitted = []
    for i in range(3):
        admitted.append(await gateways[i % 2].admit(principal, prompt, frontier=False))
    assert [h["x-ratelimit-remaining-requests"] for h in admitted] == ["2", "1", "0"]
    for limiter in gateways:
        with pytest.raises(RateLimited, match="key requests 3 per minute"):
            await limiter.admit(principal, prompt, frontier=False)
    # Another key of the same tenant is not affected: limits are per key here.
    other = Principal("k2", "acme", frozenset({INFERENCE}), key_limits=Limits(requests_per_min=3))
    assert (await gateways[0].admit(other, prompt, frontier=False))["x-ratelimit-remaining-requests"] == "2"
    for limiter in gateways:
        await limiter.aclose()


async def test_no_limits_cost_nothing_and_send_no_headers() -> None:
    principal = Principal("k", "acme", frozenset({INFERENCE}))
    limiter = RateLimiter.create(None, Metrics())
    assert (
        await limiter.admit(principal, PromptMeter(None).prompt({"model": "m", "messages": []}), frontier=False) == {}
    )


async def test_token_limits_count_the_prompt_with_the_models_tokenizer_or_tiktoken(base_model_dir: Path) -> None:
    import tiktoken
    from transformers import AutoTokenizer

    from gateway.tokens import FRONTIER_ENCODING

    messages = [{"role": "user", "content": "Summarise the quarterly report in three bullet points, please."}]
    payload = {"model": "m", "messages": messages, "max_tokens": 50}
    ids = AutoTokenizer.from_pretrained(str(base_model_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # OpenAI's chat estimate: 3 tokens of framing per message and 3 to prime the reply.
    frontier = 3 + len(tiktoken.get_encoding(FRONTIER_ENCODING).encode(messages[0]["content"])) + 3
    assert len(ids) != frontier  # the two counts differ, so the test tells which one was charged
    limiter, meter = RateLimiter.create(None, Metrics()), PromptMeter(base_model_dir)
    for tenant, on_frontier, prompt_tokens in (("acme", False, len(ids)), ("globex", True, frontier)):
        principal = Principal(f"k-{tenant}", tenant, frozenset({INFERENCE}), key_limits=Limits(tokens_per_min=1000))
        headers = await limiter.admit(principal, meter.prompt(payload), frontier=on_frontier)
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - prompt_tokens - 50)
    await limiter.aclose()


async def test_each_of_n_or_best_of_completions_is_charged_its_max_tokens(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        database = Database.open(app.state.gateway.settings.registry_url)  # beside the app, as `quiver keys` writes
        try:
            token = KeyStore(database).create_key("acme", [INFERENCE], tokens_per_min=1000).token
        finally:
            database.close()
        await app.state.gateway.registry.refresh()
        body = CHAT | {"model": "m", "max_tokens": 50, "n": 4}  # prompt bound 66 + 4 x 50 = 266 tokens
        ok = await client.post("/v1/chat/completions", json=body, headers=_auth(token))
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-tokens"] == str(1000 - 266)
        many = await client.post("/v1/chat/completions", json=body | {"n": 16, "max_tokens": 60}, headers=_auth(token))
        assert many.status_code == 429 and "needs 1026 tokens" in many.json()["error"]["message"]
        # best_of makes vLLM generate that many and return the best n: each of those is charged its max_tokens.
        best_of = body | {"n": 2, "best_of": 15, "max_tokens": 70}  # 66 + 15 x 70
        best = await client.post("/v1/chat/completions", json=best_of, headers=_auth(token))
        assert best.status_code == 429 and "needs 1116 tokens" in best.json()["error"]["message"]


class _RefusingVllm(Upstreams):
    """vLLM refuses every connection (it is down); the frontier answers."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "vllm":
            raise httpx.ConnectError("connection refused")
        return super().__call__(request)


_TO_FRONTIER = '[[rules]]\nname = "big"\nmatch = { header = { "x-quiver-route" = "big" } }\nmodel = "frontier:f"\n'


@pytest.mark.parametrize(
    ("routing", "upstreams", "headers", "reason"),
    [(_TO_FRONTIER, Upstreams, {"x-quiver-route": "big"}, None), ("", _RefusingVllm, {}, "no_healthy_replica")],
    ids=["rule", "fallback"],
)
async def test_a_request_planned_first_to_a_frontier_is_charged_the_frontiers_count(
    routing: str, upstreams: type[Upstreams], headers: dict[str, str], reason: str | None, tmp_path: Path
) -> None:
    import tiktoken

    from gateway.tokens import FRONTIER_ENCODING

    body = CHAT | {"model": "m", "max_tokens": 4}  # the base model's name: nothing in it says "frontier"
    # OpenAI's chat estimate with tiktoken: 3 tokens of framing per message and 3 to prime the reply.
    on_frontier = 3 + len(tiktoken.get_encoding(FRONTIER_ENCODING).encode("hi")) + 3
    on_base = PromptMeter.bound(body)  # no base tokenizer here: the byte bound, 66
    assert on_frontier != on_base
    app = create_app(routing_settings(tmp_path, routing), transport=httpx.MockTransport(upstreams()))
    async for client in _client(app):
        with keys_of(app) as keys:
            token = keys.create_key("acme", [INFERENCE], tokens_per_min=1000).token
        await app.state.gateway.registry.refresh()
        answer = await client.post("/v1/chat/completions", json=body, headers=_auth(token) | headers)
        assert answer.status_code == 200 and answer.headers["x-quiver-served-by"] == "frontier:f"
        assert answer.headers.get("x-quiver-fallback-reason") == reason
        assert answer.headers["x-ratelimit-remaining-tokens"] == str(1000 - on_frontier - 4)
        if not reason:  # the same request without the rule's header goes to the base model, and is counted so
            answer = await client.post("/v1/chat/completions", json=body, headers=_auth(token))
            assert answer.headers["x-quiver-served-by"] == "m"
            assert answer.headers["x-ratelimit-remaining-tokens"] == str(1000 - on_frontier - 4 - on_base - 4)
