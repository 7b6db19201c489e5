"""The OpenAI API through the gateway against a real vLLM, with the official client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from core import embedded
from tests.integration.openai_helpers import QUESTION, client, error_of, greedy
from tests.servers import GatewayServer, wait_until

BASE = embedded.SERVED_NAME


def test_models_lists_the_base_under_both_names(gateway: GatewayServer) -> None:
    ids = {m.id: m for m in client(gateway.url).models.list()}
    assert BASE in ids and "base" in ids
    assert ids["base"].parent is None  # type: ignore[attr-defined]
    assert client(gateway.url).models.retrieve("base").id == "base"


def test_base_chat_answers_and_says_who_served_it(gateway: GatewayServer) -> None:
    text, headers = greedy(gateway.url, "base")
    assert "Paris" in text
    assert headers["x-quiver-served-by"] == BASE
    same, _ = greedy(gateway.url, BASE)
    assert same == text


def test_text_completion_plain_and_streamed(gateway: GatewayServer) -> None:
    c = client(gateway.url)
    plain = c.completions.create(model="base", prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = c.completions.create(
        model="base", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text
    assert plain.usage is not None and plain.usage.completion_tokens == 8


def test_streamed_chat_arrives_chunk_by_chunk_and_matches_plain(gateway: GatewayServer) -> None:
    c = client(gateway.url)
    plain = c.chat.completions.create(model="base", messages=QUESTION, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        c.chat.completions.create(
            model="base",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(deltas) > 2, "a stream must arrive as several chunks, not one buffered body"
    assert "".join(deltas) == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def test_stream_is_not_buffered(gateway: GatewayServer) -> None:
    body = {
        "model": "base",
        "messages": QUESTION,
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    labels = {"endpoint": "/v1/chat/completions", "model": "base", "adapter": BASE}
    finished_before = gateway.metric("quiver_request_duration_seconds_count", **labels)
    events = 0
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events += 1
                if events == 1:
                    # The first token reached us while the gateway is still relaying the rest.
                    assert gateway.metric("quiver_request_duration_seconds_count", **labels) == finished_before
    assert events >= 200
    assert gateway.metric("quiver_request_duration_seconds_count", **labels) == finished_before + 1


def test_parameters_pass_through(gateway: GatewayServer) -> None:
    c = client(gateway.url)
    many = c.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=5,
        n=2,
        temperature=1.0,
        top_p=0.9,
        seed=7,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=2,
    )
    assert len(many.choices) == 2
    assert many.choices[0].logprobs is not None and many.choices[0].logprobs.content
    assert len(many.choices[0].logprobs.content[0].top_logprobs) == 2
    again = c.chat.completions.create(
        model="base",
        messages=QUESTION,
        max_tokens=5,
        n=2,
        temperature=1.0,
        top_p=0.9,
        seed=7,  # type: ignore[arg-type]
    )
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in many.choices]
    stopped = c.chat.completions.create(model="base", messages=QUESTION, max_tokens=20, temperature=0, stop=["Paris"])  # type: ignore[arg-type]
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(model="base", messages=QUESTION, max_tokens=1, temperature=0)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1  # type: ignore[union-attr]


def test_response_format_json_object(gateway: GatewayServer) -> None:
    answer = client(gateway.url).chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Give a JSON object with the key city set to Paris."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_unknown_model_is_404_model_not_found(gateway: GatewayServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway.url).chat.completions.create(model="no-such-adapter", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    response = httpx.get(f"{gateway.url}/v1/models/no-such-adapter")
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": QUESTION}).encode(), "model"),
        (json.dumps({"model": "base"}).encode(), "messages"),
        (json.dumps({"model": "base", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "base", "messages": QUESTION, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "base", "messages": QUESTION, "temperature": "hot"}).encode(), "temperature"),
    ],
)
def test_malformed_body_is_400_in_openai_shape(gateway: GatewayServer, body: bytes, param: str | None) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param and param in error["message"]


def test_vllm_rejection_comes_back_as_400(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 100000}
    )
    assert response.status_code == 400
    assert "max" in error_of(response)["message"].lower()


def test_health_and_metrics(gateway: GatewayServer) -> None:
    health = httpx.get(f"{gateway.url}/health").json()
    assert health["status"] == "ok" and health["vllm"]["state"] == "up"
    client(gateway.url).chat.completions.create(model="base", messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    list(client(gateway.url).chat.completions.create(model="base", messages=QUESTION, max_tokens=3, stream=True))  # type: ignore[arg-type]
    text = httpx.get(f"{gateway.url}/metrics").text
    assert (
        f'quiver_requests_total{{adapter="{BASE}",endpoint="/v1/chat/completions",model="base",status="200"}}' in text
    )
    assert "quiver_request_duration_seconds_bucket" in text
    assert "quiver_time_to_first_token_seconds_count" in text
    assert gateway.metric("quiver_tokens_total", model="base", adapter=BASE, kind="completion") >= 3


def test_a_client_that_leaves_mid_stream_closes_the_upstream_request(gateway: GatewayServer) -> None:
    # vLLM aborts a request whose connection closes; what the gateway must do is close it at once. (vLLM-CPU's
    # /metrics gauges do not move while it streams, so the abort is observed on the gateway's side.)
    replica = gateway.gateway.pool.first
    body = {"model": "base", "messages": QUESTION, "max_tokens": 1024, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: {"))
        assert response.status_code == 200 and '"error"' not in first, first
    left = time.monotonic()  # the connection closes as the block ends, about 1000 tokens early
    wait_until(lambda: replica.in_flight == 0, timeout_s=5, what="the gateway to close the upstream request")
    closed_in = time.monotonic() - left
    print(f"client left mid-stream: the upstream request was closed after {1000 * closed_in:.0f} ms")
    assert closed_in < 1.0
    assert greedy(gateway.url, "base", max_tokens=2)[0]  # and vLLM serves the next one
