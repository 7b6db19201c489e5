"""Two real vLLM replicas of the same base: adapter affinity, spreading, failover and reconcile."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import embedded
from core.vllm_server import VllmServer
from gateway import Settings
from tests.integration.openai_helpers import QUESTION, greedy, push
from tests.servers import running_gateway, running_vllm, wait_until

# The second replica allows longer prompts, so it doubles as the larger-context frontier below.
SECOND_MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def second_vllm(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    log = tmp_path_factory.mktemp("vllm2") / "vllm.log"
    # Eager: the second replica serves a few requests, and skipping vLLM's compile halves its start-up here.
    options = {"max_loras": 4, "max_lora_rank": 16, "max_model_len": SECOND_MAX_MODEL_LEN}
    with running_vllm(base_model_dir, log, extra_args=("--enforce-eager",), **options) as server:
        yield server


def replicas(gateway_url: str) -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in httpx.get(f"{gateway_url}/health").json()["replicas"]}


def test_affinity_keeps_an_adapter_on_its_replica_and_spreads_it_when_saturated(
    settings: Settings, vllm: VllmServer, second_vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    two = settings.model_copy(update={"vllm_url": f"{vllm.url},{second_vllm.url}", "replica_saturation": 1})
    with running_gateway(two) as gateway:
        push(gateway.url, unique_name, lora_dirs[0])
        served = {greedy(gateway.url, unique_name)[1]["x-quiver-replica"] for _ in range(4)}
        assert served == {"r0"}, "with room everywhere, an adapter stays where it is loaded"
        lora = f"{unique_name}@v1"
        assert replicas(gateway.url)["r1"]["adapters_loaded"] == []

        # Long enough (no early EOS) that it is still generating when the next request is placed.
        body = {"model": unique_name, "messages": QUESTION, "max_tokens": 128, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as held:
            assert held.headers["x-quiver-replica"] == "r0"
            # r0 has one request in flight, its saturation point: the hot adapter spreads to r1.
            _, headers = greedy(gateway.url, unique_name)
            assert headers["x-quiver-replica"] == "r1"
            held.read()
        assert replicas(gateway.url)["r1"]["adapters_loaded"] == [lora]


# Restarting a vLLM takes 40 s on a quiet machine and minutes when the cores are shared.
@pytest.mark.timeout(900)
def test_failover_to_the_other_replica_and_reconcile_when_it_returns(
    settings: Settings, vllm: VllmServer, second_vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    # The second vLLM is r0 here, so stopping it takes away the replica that holds the adapter.
    two = settings.model_copy(update={"vllm_url": f"{second_vllm.url},{vllm.url}"})
    with running_gateway(two) as gateway:
        push(gateway.url, unique_name, lora_dirs[0])
        before, headers = greedy(gateway.url, unique_name)
        assert headers["x-quiver-replica"] == "r0"

        # A stream that already sent bytes is not retried elsewhere when its replica dies: it ends with an error.
        body = {"model": unique_name, "messages": QUESTION, "max_tokens": 512, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as stream:
            assert stream.headers["x-quiver-replica"] == "r0"
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            second_vllm.stop(grace_s=0)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and json.loads(rest[-1][6:])["error"]["code"] == "upstream_error"
        assert "data: [DONE]" not in rest

        answers = [greedy(gateway.url, unique_name) for _ in range(3)]
        assert [h["x-quiver-replica"] for _, h in answers] == ["r1"] * 3, "no request fails while r0 is gone"
        assert {text for text, _ in answers} == {before}
        assert replicas(gateway.url)["r0"]["state"] == "down"

        second_vllm.start()
        second_vllm.wait_ready(timeout_s=600)
        wait_until(lambda: replicas(gateway.url)["r0"]["state"] == "up", what="the gateway to see r0 again")
        # r0 forgot the adapter it had; the gateway knows, and the adapter stays where it is loaded now.
        assert replicas(gateway.url)["r0"]["adapters_loaded"] == []
        assert greedy(gateway.url, unique_name)[1]["x-quiver-replica"] == "r1"
        other = f"{unique_name}-b"
        push(gateway.url, other, lora_dirs[1])
        assert greedy(gateway.url, other)[1]["x-quiver-replica"] == "r0", "the returned replica takes new work"


def test_prompt_too_long_for_the_replicas_falls_back_to_a_larger_context(
    settings: Settings, second_vllm: VllmServer, tmp_path: Path
) -> None:
    routing = tmp_path / "routing.toml"
    routing.write_text(
        f"""
fallback = ["frontier:long"]

[frontiers.long]
base_url = "{second_vllm.url}/v1"
default_model = "{embedded.SERVED_NAME}"
context_tokens = {SECOND_MAX_MODEL_LEN}
"""
    )
    with running_gateway(settings.model_copy(update={"routing_file": routing})) as gateway:
        long = [{"role": "user", "content": "Summarize: " + "the cat sat on the mat. " * 400}]
        body = {"model": "base", "messages": long, "max_tokens": 8}
        answered = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=300)
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-quiver-served-by"] == "frontier:long"
        assert answered.headers["x-quiver-fallback-reason"] == "context_length"
        assert answered.json()["usage"]["prompt_tokens"] > 2048
