"""Routing policies, the frontier path and each fallback trigger, against the session's real vLLM.

The frontier here is a real OpenAI-compatible server on loopback: the same vLLM, reached as a
frontier API under another model name (``gpt-test``), through the frontier code path.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import embedded
from core.processes import free_port
from core.vllm_server import VllmServer
from gateway import Settings
from tests.integration.openai_helpers import QUESTION, client, error_of, push
from tests.servers import GatewayServer, running_gateway


def routing_file(tmp_path: Path, vllm: VllmServer, extra: str = "", fallback: str = "[]") -> Path:
    path = tmp_path / "routing.toml"
    path.write_text(
        f"""
fallback = {fallback}

[frontiers.local]
base_url = "{vllm.url}/v1"
models = {{ "gpt-test" = "{embedded.SERVED_NAME}" }}
context_tokens = 2048
{extra}
"""
    )
    return path


def ask(url: str, model: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0} | kwargs
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120)


@pytest.fixture
def routed(settings: Settings, vllm: VllmServer, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"routing_file": routing_file(tmp_path, vllm)})


def test_rule_on_a_header_routes_to_its_adapter(
    settings: Settings, vllm: VllmServer, tmp_path: Path, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    rule = f"""
[[rules]]
name = "triage-header"
match = {{ header = {{ "x-quiver-route" = "triage" }} }}
model = "{unique_name}"

[[rules]]
name = "billing-team"
match = {{ metadata = {{ "team" = "billing" }}, model = "auto" }}
model = "{unique_name}"
"""
    with running_gateway(settings.model_copy(update={"routing_file": routing_file(tmp_path, vllm, rule)})) as gateway:
        assert push(gateway.url, unique_name, lora_dirs[0]).status_code == 201
        matched = ask(gateway.url, "base", headers={"x-quiver-route": "triage"})
        assert matched.status_code == 200, matched.text
        assert matched.headers["x-quiver-served-by"] == f"{unique_name}@v1"
        assert matched.headers["x-quiver-route"] == "rule:triage-header"
        by_metadata = ask(gateway.url, "auto", metadata={"team": "billing"})
        assert by_metadata.headers["x-quiver-served-by"] == f"{unique_name}@v1"
        assert by_metadata.headers["x-quiver-route"] == "rule:billing-team"
        other = ask(gateway.url, "base", headers={"x-quiver-route": "something-else"})
        assert other.headers["x-quiver-served-by"] == embedded.SERVED_NAME
        assert other.headers["x-quiver-route"] == "model"


def test_auto_picks_the_adapter_whose_description_matches(
    gateway: GatewayServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    recipes, invoices = f"{unique_name}-recipes", f"{unique_name}-invoices"
    push(gateway.url, recipes, lora_dirs[0])
    push(gateway.url, invoices, lora_dirs[1])
    for name, description, examples in (
        (recipes, "Cooking recipes and kitchen questions", ["How long do I boil an egg?", "A quick pasta sauce?"]),
        (invoices, "Billing, invoices and refunds", ["I was charged twice", "Where is my VAT invoice?"]),
    ):
        patched = httpx.patch(
            f"{gateway.url}/v1/adapters/{name}", json={"description": description, "examples": examples}
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["routing"]["examples"] == examples

    def auto(prompt: str) -> httpx.Response:
        body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)

    cooking = auto("How long should I boil rice for?")
    assert cooking.headers["x-quiver-served-by"] == f"{recipes}@v1"
    assert cooking.headers["x-quiver-route"].startswith(f"auto:{recipes};score=")
    billing = auto("My card was billed two times for one order, please refund me")
    assert billing.headers["x-quiver-served-by"] == f"{invoices}@v1"
    unrelated = auto("Translate 'good night' into German")
    assert unrelated.headers["x-quiver-served-by"] == embedded.SERVED_NAME
    assert unrelated.headers["x-quiver-route"].startswith("auto:default;score=")


def test_frontier_by_model_name_plain_and_streamed(routed: Settings) -> None:
    with running_gateway(routed) as gateway, client(gateway.url) as openai:
        raw = openai.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=QUESTION,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        assert raw.headers["x-quiver-served-by"] == "frontier:local"
        assert raw.parse().choices[0].message.content
        with openai.chat.completions.with_streaming_response.create(
            model="gpt-test",
            messages=QUESTION,
            max_tokens=8,
            stream=True,  # type: ignore[arg-type]
        ) as stream:
            assert stream.headers["x-quiver-served-by"] == "frontier:local"
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
        assert text


def test_adapter_that_fails_to_load_falls_back_along_its_own_chain(
    routed: Settings, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    with running_gateway(routed) as gateway:
        assert push(gateway.url, unique_name, lora_dirs[0]).status_code == 201
        chain = httpx.patch(f"{gateway.url}/v1/adapters/{unique_name}", json={"fallback": ["frontier:local"]})
        assert chain.json()["routing"]["fallback"] == ["frontier:local"]
        # The stored files go bad after the upload was validated: vLLM refuses to load them.
        weights = next((routed.adapter_store / unique_name).glob("*/adapter_model.safetensors"))
        weights.chmod(0o644)
        weights.write_bytes(b"not safetensors")
        answered = ask(gateway.url, unique_name)
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-quiver-served-by"] == "frontier:local"
        assert answered.headers["x-quiver-fallback-reason"] == "adapter_load_failed"
        assert gateway.metric("quiver_fallbacks_total", reason="adapter_load_failed", target="frontier:local") == 1

        httpx.patch(f"{gateway.url}/v1/adapters/{unique_name}", json={"fallback": []})
        failed = ask(gateway.url, unique_name)
        assert failed.status_code == 502 and "refused to load" in error_of(failed)["message"]


def test_no_healthy_replica_falls_back_to_the_default_chain(routed: Settings, vllm: VllmServer) -> None:
    dead = routed.model_copy(
        update={
            "vllm_url": f"http://127.0.0.1:{free_port()}",
            "routing_file": routing_file(routed.data_dir.parent, vllm, fallback='["frontier:local"]'),
        }
    )
    with running_gateway(dead) as gateway:
        answered = ask(gateway.url, "base")
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-quiver-served-by"] == "frontier:local"
        assert answered.headers["x-quiver-fallback-reason"] == "no_healthy_replica"


def test_upstream_timeout_before_the_first_byte_falls_back(routed: Settings, vllm: VllmServer) -> None:
    # vLLM needs 85 ms or more for any answer here, so a 20 ms read timeout always fires; the frontier's is 60 s.
    impatient = routed.model_copy(
        update={
            "request_timeout_s": 0.02,
            "routing_file": routing_file(routed.data_dir.parent, vllm, fallback='["frontier:local"]'),
        }
    )
    with running_gateway(impatient) as gateway:
        for stream in (False, True):
            answered = ask(gateway.url, "base", stream=stream)
            assert answered.status_code == 200, answered.text
            assert answered.headers["x-quiver-served-by"] == "frontier:local"
            assert answered.headers["x-quiver-fallback-reason"] == "upstream_timeout"


@pytest.fixture
def hang_up_server() -> Iterator[int]:
    """A server that accepts each connection and closes it without a word."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_upstream_error_falls_back_and_client_errors_do_not(
    routed: Settings, vllm: VllmServer, hang_up_server: int
) -> None:
    broken = f"""
[frontiers.broken]
base_url = "http://127.0.0.1:{hang_up_server}/v1"
default_model = "whatever"
"""
    path = routing_file(routed.data_dir.parent, vllm, broken, fallback='["base"]')
    with running_gateway(routed.model_copy(update={"routing_file": path})) as gateway:
        answered = ask(gateway.url, "frontier:broken")
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-quiver-served-by"] == embedded.SERVED_NAME
        assert answered.headers["x-quiver-fallback-reason"] == "upstream_error"
        # vLLM refuses this (a 400): the client's own mistake is answered as is, not sent down the chain.
        refused = ask(gateway.url, "gpt-test", logprobs=True, top_logprobs=1000)
        assert refused.status_code == 400, refused.text
        assert gateway.metric("quiver_fallbacks_total", reason="upstream_error", target="frontier:local") == 0


def test_prompt_too_long_for_every_target_is_a_400(routed: Settings) -> None:
    with running_gateway(routed) as gateway:
        long = [{"role": "user", "content": "word " * 3000}]
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions", json={"model": "base", "messages": long, "max_tokens": 8}
        )
        assert response.status_code == 400
        assert error_of(response)["code"] == "context_length_exceeded"


def test_overloaded_replica_falls_back(routed: Settings, vllm: VllmServer) -> None:
    busy = routed.model_copy(
        update={
            "replica_max_in_flight": 1,
            "routing_file": routing_file(routed.data_dir.parent, vllm, fallback='["frontier:local"]'),
        }
    )
    with running_gateway(busy) as gateway:
        # Long enough (no early EOS) that it still holds the replica when the second request is placed.
        body = {"model": "base", "messages": QUESTION, "max_tokens": 64, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as held:
            assert held.headers["x-quiver-served-by"] == embedded.SERVED_NAME
            # The first request holds the replica's only place until its stream is read to the end.
            second = ask(gateway.url, "base")
            assert second.headers["x-quiver-served-by"] == "frontier:local"
            assert second.headers["x-quiver-fallback-reason"] == "overloaded"
            lines = [line for line in held.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert all("error" not in json.loads(line[6:]) for line in lines[:-1])
