"""The naive transformers + PEFT server the Quiver benchmark compares against, on a tiny base, and its report."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest import naive
from loadtest.routing import Run
from tests import factories

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> naive.NaiveModel:
    out = tmp_path_factory.mktemp("naive")
    adapters = {f"{name}@v1": factories.make_lora_adapter(tiny_base, out / name, seed=seed)
                for seed, name in enumerate(("a", "b"), start=1)}  # fmt: skip
    return naive.NaiveModel(tiny_base, adapters, "tiny")


@pytest.fixture
async def client(server: naive.NaiveModel) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(naive.create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://naive") as client:
        yield client


async def _chat(client: httpx.AsyncClient, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_ignore_eos_makes_every_answer_max_tokens_long_plain_and_streamed(client: httpx.AsyncClient) -> None:
    plain = await _chat(client, "a@v1", ignore_eos=True)
    assert plain["usage"]["completion_tokens"] == 4 and plain["choices"][0]["finish_reason"] == "length"

    body = {"model": "a@v1", "messages": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]  # greedy: the same answer either way
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_each_model_name_is_answered_by_its_own_adapter_and_the_base_by_none(client: httpx.AsyncClient) -> None:
    answers = {m: (await _chat(client, m, ignore_eos=True))["choices"][0]["message"]["content"]
               for m in ("a@v1", "b@v1", "tiny")}  # fmt: skip
    assert len(set(answers.values())) == 3
    assert (await _chat(client, "a@v1", ignore_eos=True))["choices"][0]["message"]["content"] == answers["a@v1"]


async def test_unknown_models_and_bad_bodies_are_openai_errors(client: httpx.AsyncClient) -> None:
    missing = await client.post("/v1/chat/completions", json={"model": "c@v1", "messages": PROMPT})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = await client.post("/v1/chat/completions", json={"model": "a@v1", "messages": PROMPT, "max_tokens": 0})
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["tiny", "a@v1", "b@v1"]


def test_the_report_gives_the_ratio_against_the_target() -> None:
    quiver, slow = naive.Side.of(Run(tokens=640, wall_s=4.0)), naive.Side.of(Run(tokens=640, wall_s=40.0))
    row = naive.Row(adapters=4, rounds=4, requests=10, concurrency=8, max_tokens=32, quiver=quiver, naive=slow)

    assert quiver.tokens_per_s == 160 and row.ratio == 10 and row.met
    assert "**10.00x** (target >= 5x: met)" in naive.markdown(row, datetime(2026, 1, 2, tzinfo=UTC))
    close = naive.Row(**{**row.__dict__, "naive": naive.Side.of(Run(tokens=640, wall_s=8.0))})
    [verdict] = naive.verdicts(close)
    assert verdict.measured == "2.00x" and not verdict.met
