"""The floor (``loadtest.floor``), the passthrough the gateway is benchmarked against, in front of the instant
upstream: plain and streamed answers relayed as they came, and no route of its own beyond the three it relays."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from loadtest import floor, instant_upstream

CHAT = {"model": "instant", "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}


@pytest.fixture
async def passthrough() -> AsyncIterator[httpx.AsyncClient]:
    upstream = httpx.ASGITransport(instant_upstream.create_app())
    app = floor.create_app("http://upstream", transport=upstream)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://floor") as client:
        yield client
    await app.state.upstream.aclose()


def events(body: str) -> list[str]:
    """The data of each server-sent event."""
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


async def test_a_plain_chat_answer_comes_back_as_the_upstream_gave_it(passthrough: httpx.AsyncClient) -> None:
    response = await passthrough.post("/v1/chat/completions", json=CHAT)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == "ok"


async def test_a_streamed_answer_is_relayed_event_by_event(passthrough: httpx.AsyncClient) -> None:
    response = await passthrough.post("/v1/chat/completions", json=CHAT | {"stream": True})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == "[DONE]" and response.text.endswith("\n\n")
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["content"] == "ok"
    assert chunks[-1]["usage"]["completion_tokens"] == 1


async def test_text_completions_and_the_model_list_are_relayed(passthrough: httpx.AsyncClient) -> None:
    completion = await passthrough.post("/v1/completions", json={"model": "instant", "prompt": "Hi", "stream": True})
    models = await passthrough.get("/v1/models")

    assert json.loads(events(completion.text)[0])["choices"][0]["text"] == "ok"
    assert [m["id"] for m in models.json()["data"]] == ["instant"]


async def test_the_floor_does_nothing_else(passthrough: httpx.AsyncClient) -> None:
    assert (await passthrough.get("/health")).status_code == 404
    assert (await passthrough.post("/v1/embeddings", json={"input": "x"})).status_code == 404
    assert (await passthrough.get("/v1/chat/completions")).status_code == 405
