"""Adapters hot-swapped into the shared base: resolution, aliases, single loads, the LRU."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai

from core import embedded
from core.vllm_server import VllmServer
from tests.integration.openai_helpers import QUESTION, client, greedy, push
from tests.servers import GatewayServer


def test_adapter_answer_differs_from_base_and_equals_vllm_direct(
    gateway: GatewayServer, vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    assert push(gateway.url, unique_name, lora_dirs[0]).status_code == 201
    via_gateway, headers = greedy(gateway.url, unique_name)
    assert headers["x-quiver-served-by"] == f"{unique_name}@v1"
    base, _ = greedy(gateway.url, "base")
    assert via_gateway != base

    direct_name = f"{unique_name}-direct"
    loaded = httpx.post(
        f"{vllm.url}/v1/load_lora_adapter", json={"lora_name": direct_name, "lora_path": str(lora_dirs[0])}, timeout=60
    )
    assert loaded.status_code == 200, loaded.text
    try:
        direct, _ = greedy(vllm.url, direct_name)
    finally:
        httpx.post(f"{vllm.url}/v1/unload_lora_adapter", json={"lora_name": direct_name}, timeout=60)
    assert via_gateway == direct


def test_model_strings_and_alias_switch(gateway: GatewayServer, lora_dirs: tuple[Path, ...], unique_name: str) -> None:
    name = unique_name
    assert push(gateway.url, name, lora_dirs[0]).json()["version"]["version"] == 1
    assert push(gateway.url, name, lora_dirs[1]).json()["version"]["version"] == 2
    v1, _ = greedy(gateway.url, f"{name}@v1")
    v2, _ = greedy(gateway.url, f"{name}@v2")
    assert v1 != v2

    _, headers = greedy(gateway.url, name)
    assert headers["x-quiver-served-by"] == f"{name}@v2", "no prod alias: the name means the latest version"

    moved = httpx.put(f"{gateway.url}/v1/adapters/{name}/aliases/prod", json={"version": 1, "force": True})
    assert moved.status_code == 200
    text, headers = greedy(gateway.url, name)
    assert headers["x-quiver-served-by"] == f"{name}@v1" and text == v1
    _, headers = greedy(gateway.url, f"{name}@prod")
    assert headers["x-quiver-served-by"] == f"{name}@v1"

    moved = httpx.put(f"{gateway.url}/v1/adapters/{name}/aliases/prod", json={"version": 2, "force": True})
    assert moved.status_code == 200
    text, headers = greedy(gateway.url, name)
    assert headers["x-quiver-served-by"] == f"{name}@v2" and text == v2

    models = {m.id: m for m in client(gateway.url).models.list()}
    for model_id in (name, f"{name}@v1", f"{name}@v2", f"{name}@prod"):
        assert models[model_id].parent == embedded.SERVED_NAME  # type: ignore[attr-defined]


def test_twenty_concurrent_first_requests_make_one_load(
    gateway: GatewayServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    push(gateway.url, unique_name, lora_dirs[2])
    lora = f"{unique_name}@v1"

    async def burst() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with c:
            answers = await asyncio.gather(
                *(
                    c.chat.completions.with_raw_response.create(model=unique_name, messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
                    for _ in range(20)
                )
            )
        return [a.headers["x-quiver-served-by"] for a in answers]

    assert asyncio.run(burst()) == [lora] * 20
    assert gateway.metric("quiver_adapter_loads_total", adapter=lora, outcome="ok") == 1


def test_lru_unloads_least_recently_used_beyond_the_bound(
    gateway: GatewayServer, vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    names = [f"{unique_name}{i}" for i in range(3)]
    for name, directory in zip(names, lora_dirs, strict=True):
        push(gateway.url, name, directory)
    for name in names:  # gateway bound is 2, so the third evicts the first
        greedy(gateway.url, name, max_tokens=2)
    assert gateway.gateway.residency.loaded == [f"{names[1]}@v1", f"{names[2]}@v1"]
    in_vllm = {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}
    assert f"{names[0]}@v1" not in in_vllm and f"{names[2]}@v1" in in_vllm
    assert gateway.metric("quiver_adapter_unloads_total", adapter=f"{names[0]}@v1") == 1
    # Using the evicted one again loads it again and answers.
    _, headers = greedy(gateway.url, names[0], max_tokens=2)
    assert headers["x-quiver-served-by"] == f"{names[0]}@v1"
    assert gateway.metric("quiver_adapter_loads_total", adapter=f"{names[0]}@v1", outcome="ok") == 2


def test_request_in_flight_keeps_its_version_when_the_alias_moves(
    gateway: GatewayServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    name, other = unique_name, f"{unique_name}-other"
    push(gateway.url, name, lora_dirs[0])
    push(gateway.url, name, lora_dirs[1])
    push(gateway.url, other, lora_dirs[2])
    httpx.put(f"{gateway.url}/v1/adapters/{name}/aliases/prod", json={"version": 1, "force": True})
    expected, _ = greedy(gateway.url, name, max_tokens=32)
    residency = gateway.gateway.residency

    # A stream far longer than the checks below take on any machine (ignore_eos: it runs to max_tokens), cut off
    # by the client once they are made. A short one can finish server-side, into the socket buffers, while the
    # client still reads its first lines, and then v1 is rightly evictable.
    body = {"model": name, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "seed": 0}
    text = ""
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.headers["x-quiver-served-by"] == f"{name}@v1"
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                text += (choices[0]["delta"].get("content") or "") if choices else ""
            if len(text) > len(expected):
                break
        assert text.startswith(expected)
        # Mid-stream: move the alias, and use two other adapters so the LRU (2 slots) must evict.
        moved = httpx.put(f"{gateway.url}/v1/adapters/{name}/aliases/prod", json={"version": 2, "force": True})
        assert moved.status_code == 200
        assert greedy(gateway.url, name, max_tokens=1)[1]["x-quiver-served-by"] == f"{name}@v2"
        # v1 is the least recently used, but in use: the LRU must evict v2 instead.
        assert greedy(gateway.url, other, max_tokens=1)[1]["x-quiver-served-by"] == f"{other}@v1"
        assert residency.in_flight(f"{name}@v1") == 1, "the stream ended before the checks: raise max_tokens"
        assert residency.loaded == [f"{name}@v1", f"{other}@v1"]

    # The client went away: the gateway lets go of v1 (and vLLM stops generating), so v1 is evictable again.
    deadline = time.monotonic() + 30
    while residency.in_flight(f"{name}@v1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert residency.in_flight(f"{name}@v1") == 0
    assert greedy(gateway.url, name, max_tokens=1)[1]["x-quiver-served-by"] == f"{name}@v2"
    assert residency.loaded == [f"{other}@v1", f"{name}@v2"]
