"""The whole app against httpx MockTransport upstreams: routing, retries and error mapping."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from access.store import KeyStore
from adapters import Registry
from gateway import Settings, create_app
from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.upstream import VllmReplica
from tests import factories
from tests.unit.test_gateway_upstream import FakeVllm, version

COMPLETION = {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}


class RestartingVllm:
    """Forgets every adapter when ``restart()`` is called, like a vLLM process that came back."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.loads = 0

    def restart(self) -> None:
        self.loaded.clear()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            data = [{"id": "m", "root": "/m", "parent": None}]
            data += [{"id": n, "root": p, "parent": "m"} for n, p in self.loaded.items()]
            return httpx.Response(200, json={"data": data})
        body = json.loads(request.content)
        if path == "/v1/load_lora_adapter":
            self.loads += 1
            self.loaded[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text="ok")
        if body["model"] not in (*self.loaded, "m"):
            return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
        return httpx.Response(200, json=COMPLETION | {"model": body["model"]})


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            yield client


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path, base_model="m", health_interval_s=3600, **extra)  # type: ignore[arg-type]


@contextmanager
def registry_of(app: FastAPI) -> Iterator[Registry]:
    """The running app's registry, opened beside it as the CLI or another gateway opens it."""
    settings = app.state.gateway.settings
    with Registry.open(settings.registry_url, settings.adapter_store) as registry:
        yield registry


@contextmanager
def keys_of(app: FastAPI) -> Iterator[KeyStore]:
    """The running app's keys and tenants, written beside it as ``quiver keys`` writes them."""
    with registry_of(app) as registry:
        yield KeyStore(registry.database)


async def test_adapter_forgotten_by_a_restarted_vllm_is_loaded_again_without_an_error(
    tmp_path: Path, tiny_adapter: Path
) -> None:
    fake = RestartingVllm()
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(fake))
    async for client in _client(app):
        with registry_of(app) as registry:
            registry.push_dir("a", tiny_adapter)
        await app.state.gateway.registry.refresh()
        chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/v1/chat/completions", json=chat)).headers["x-quiver-served-by"] == "a@v1"
        fake.restart()  # before any health poll notices
        again = await client.post("/v1/chat/completions", json=chat)
        assert again.status_code == 200 and again.headers["x-quiver-served-by"] == "a@v1"
        assert fake.loads == 2


async def test_reload_keeps_the_in_flight_count_and_loads_once() -> None:
    fake = FakeVllm()
    residency = Residency(VllmReplica("http://vllm", transport=httpx.MockTransport(fake)), 2, Metrics())
    async with residency.lease(version("a")) as resident:
        seen = resident.generation
        await asyncio.gather(*(residency.reload(version("a"), resident, seen) for _ in range(5)))
        assert resident.in_flight == 1 and resident.generation == seen + 1
        assert fake.loads == ["a@v1", "a@v1"]
        # Still protected from eviction while the request runs.
        await residency.ensure_loaded(version("b"))
        await residency.ensure_loaded(version("c"))
        assert "a@v1" in residency.loaded


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


async def test_upstream_that_never_answers_is_504(tmp_path: Path, silent_server: int) -> None:
    settings = _settings(tmp_path, vllm_url=f"http://127.0.0.1:{silent_server}", request_timeout_s=0.2)
    async for client in _client(create_app(settings)):
        response = await client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user"}]})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"


async def test_upstream_that_hangs_up_is_502(tmp_path: Path) -> None:
    def hang_up(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    async for client in _client(create_app(_settings(tmp_path), transport=httpx.MockTransport(hang_up))):
        response = await client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user"}]})
        assert response.status_code == 502
        body = response.json()["error"]
        assert body["code"] == "upstream_error" and "127.0.0.1" not in body["message"]


async def test_unreachable_is_503_while_recent_then_502(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async for client in _client(create_app(_settings(tmp_path), transport=httpx.MockTransport(refuse))):
        starting = await client.post("/v1/chat/completions", json=chat)
        assert starting.status_code == 503 and starting.headers["retry-after"] == "2"
    gone = _settings(tmp_path / "gone", unreachable_after_s=0)
    async for client in _client(create_app(gone, transport=httpx.MockTransport(refuse))):
        unreachable = await client.post("/v1/chat/completions", json=chat)
        assert unreachable.status_code == 502 and unreachable.json()["error"]["code"] == "upstream_unreachable"


async def test_unknown_route_and_method_are_openai_errors(tmp_path: Path) -> None:
    async for client in _client(create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))):
        missing = await client.get("/v1/nothing-here")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
        wrong = await client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and "error" in wrong.json()


async def _listed(client: httpx.AsyncClient) -> dict[str, dict[str, object]]:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    return {card["id"]: card for card in body["data"]}


async def test_models_list_and_cards_follow_every_registry_change(tmp_path: Path) -> None:
    model = factories.tiny_llama_model()
    first = factories.make_lora_adapter(model, tmp_path / "one", seed=1)
    second = factories.make_lora_adapter(model, tmp_path / "two", seed=2)
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        view = app.state.gateway.registry
        assert set(await _listed(client)) == {"m", "base"}
        with registry_of(app) as registry:
            registry.push_dir("a", first)
        await view.refresh()
        assert set(await _listed(client)) == {"m", "base", "a", "a@v1"}
        with registry_of(app) as registry:
            registry.push_dir("a", second)
        await view.set_alias("a", "staging", 1)
        cards = await _listed(client)
        assert set(cards) == {"m", "base", "a", "a@v1", "a@v2", "a@staging"}
        assert cards["a@staging"] == {**cards["a@v1"], "id": "a@staging"}
        assert cards["a"]["root"] == "a@v2" and cards["a"]["parent"] == "m" and cards["m"]["parent"] is None
        assert cards["m"]["root"] == cards["base"]["root"] == "m"  # the name, not the vLLM's path ("/m")
        for model_id, card in cards.items():
            one = (await client.get(f"/v1/models/{model_id}")).json()
            assert one | {"created": 0} == card | {"created": 0}  # the base's `created` is the time of asking
        missing = await client.get("/v1/models/a@v3")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("param", "what"), [("n", "choices"), ("best_of", "completions to choose from")])
async def test_n_and_best_of_are_capped_per_request(param: str, what: str, tmp_path: Path) -> None:
    fake = RestartingVllm()
    app = create_app(_settings(tmp_path, max_n=4), transport=httpx.MockTransport(fake))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async for client in _client(app):
        for endpoint, body in (("/v1/chat/completions", chat), ("/v1/completions", {"model": "m", "prompt": "hi"})):
            refused = await client.post(endpoint, json=body | {param: 1000})
            assert refused.status_code == 400
            assert refused.json()["error"] == {
                "message": f"{param}: at most 4 {what} per request, got 1000",
                "type": "invalid_request_error",
                "param": param,
                "code": "invalid_request",
            }
            assert (await client.post(endpoint, json=body | {param: 4})).status_code == 200


class ShortContextVllm(RestartingVllm):
    """Serves a 2,048-token context, as vLLM's /v1/models reports it."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "root": "/m", "max_model_len": 2048}]})
        return super().__call__(request)


async def test_a_request_over_the_context_names_max_tokens_when_the_prompt_alone_fits(
    tmp_path: Path, base_model_dir: Path
) -> None:
    app = create_app(
        _settings(tmp_path, base_model_path=base_model_dir), transport=httpx.MockTransport(ShortContextVllm())
    )
    short = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    long = {"model": "m", "messages": [{"role": "user", "content": "word " * 1500}]}  # about 1,500 tokens
    async for client in _client(app):
        cases = [
            (short | {"max_tokens": 100_000_000}, "max_tokens"),
            (short | {"max_completion_tokens": 100_000_000}, "max_completion_tokens"),
            (long | {"max_tokens": 1000}, "max_tokens"),
            (long | {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}, "messages"),
        ]
        for body, param in cases:
            refused = await client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert (error["param"], error["code"]) == (param, "context_length_exceeded")
            assert "2048-token context of any target that could answer 'm'" in error["message"]
        assert (
            "max_tokens 100000000 plus the prompt" in (await client.post("/v1/chat/completions", json=cases[0][0])).text
        )
        prompt = await client.post("/v1/completions", json={"model": "m", "prompt": "word " * 3000, "max_tokens": 8})
        assert prompt.json()["error"]["param"] == "prompt"
        assert (await client.post("/v1/chat/completions", json=long | {"max_tokens": 500})).status_code == 200
