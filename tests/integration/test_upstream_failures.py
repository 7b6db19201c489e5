"""vLLM killed and restarted, and a vLLM that is not there, seen through the gateway."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway import Settings
from quiver.vllm_server import VllmServer
from tests.integration.openai_helpers import QUESTION, error_of, greedy, push
from tests.servers import GatewayServer, healthy, running_gateway, wait_until


# A vLLM restart takes 40 s on a quiet machine and several minutes when other work holds the cores.
@pytest.mark.timeout(900)
def test_vllm_killed_then_restarted(
    gateway: GatewayServer, vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    push(gateway.url, unique_name, lora_dirs[0])
    before, _ = greedy(gateway.url, unique_name)
    lora = f"{unique_name}@v1"
    assert gateway.metric("quiver_adapter_loads_total", adapter=lora, outcome="ok") == 1

    vllm.stop(grace_s=0)
    down = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": unique_name, "messages": QUESTION})
    assert down.status_code == 503
    assert int(down.headers["retry-after"]) >= 1
    assert error_of(down)["code"] == "upstream_unavailable"
    assert httpx.get(f"{gateway.url}/health").status_code == 503

    vllm.start()
    vllm.wait_ready(timeout_s=600)
    wait_until(lambda: healthy(gateway.url), what="the gateway to see vLLM again")
    after, headers = greedy(gateway.url, unique_name)
    assert headers["x-quiver-served-by"] == lora
    assert after == before
    assert gateway.metric("quiver_adapter_loads_total", adapter=lora, outcome="ok") == 2


def test_nothing_listening_is_503_with_retry_after(settings: Settings) -> None:
    from quiver.vllm_server import free_port

    nowhere = settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{free_port()}", "base_model_path": None})
    with running_gateway(nowhere) as gateway:
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "base", "messages": QUESTION})
        assert response.status_code == 503 and "retry-after" in response.headers
        assert error_of(response)["code"] == "upstream_unavailable"
