"""vLLM killed and restarted, and a vLLM that is not there, seen through the gateway."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.processes import healthy
from core.vllm_server import VllmServer
from gateway import Settings
from tests.integration.openai_helpers import QUESTION, error_of, greedy, push
from tests.servers import GatewayServer, running_gateway, wait_until


# A vLLM restart takes 40 s on a quiet machine and several minutes when other work holds the cores.
@pytest.mark.timeout(900)
def test_vllm_killed_then_restarted(
    gateway: GatewayServer, vllm: VllmServer, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    push(gateway.url, unique_name, lora_dirs[0])
    before, _ = greedy(gateway.url, unique_name)
    lora = f"{unique_name}@v1"
    assert gateway.metric("quiver_adapter_loads_total", adapter=lora, outcome="ok") == 1

    # kill -9 under load: streams in flight on both the adapter and the base when vLLM dies.
    ended: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def load(model: str) -> None:
        body = {"model": model, "messages": QUESTION, "max_tokens": 256, "ignore_eos": True, "stream": True}
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as r:
                    for _ in r.iter_lines():
                        pass
                    ended.append((time.monotonic(), r.status_code))
            except httpx.HTTPError as exc:
                ended.append((time.monotonic(), type(exc).__name__))
            if ended and ended[-1][1] != 200:
                time.sleep(0.1)

    clients = [threading.Thread(target=load, args=(m,), daemon=True) for m in (unique_name, "base", unique_name)]
    for c in clients:
        c.start()
    try:
        time.sleep(2)  # requests in flight
        assert vllm.process is not None
        os.killpg(vllm.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        down = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": unique_name, "messages": QUESTION})
        to_503 = time.monotonic() - killed
    finally:
        stop.set()
    assert down.status_code == 503 and to_503 < 1.0, (down.status_code, down.text, to_503)
    assert int(down.headers["retry-after"]) >= 1
    assert error_of(down)["code"] == "upstream_unavailable"
    for c in clients:
        c.join(30)
        assert not c.is_alive(), "a request hung after vLLM died"
    after_kill = [status for at, status in ended if at > killed]
    assert after_kill and all(status in (200, 502, 503) for status in after_kill), after_kill
    print(f"kill -9 of vLLM under load: 503 in {1000 * to_503:.0f} ms; {len(after_kill)} requests ended after it")
    vllm.process.wait(30)
    assert httpx.get(f"{gateway.url}/health").status_code == 503

    vllm.start()
    vllm.wait_ready(timeout_s=600)
    wait_until(lambda: healthy(f"{gateway.url}/health"), what="the gateway to see vLLM again")
    after, headers = greedy(gateway.url, unique_name)
    assert headers["x-quiver-served-by"] == lora
    assert after == before
    assert gateway.metric("quiver_adapter_loads_total", adapter=lora, outcome="ok") == 2


def test_nothing_listening_is_503_with_retry_after(settings: Settings) -> None:
    from core.processes import free_port

    nowhere = settings.model_copy(update={"vllm_url": f"http://127.0.0.1:{free_port()}", "base_model_path": None})
    with running_gateway(nowhere) as gateway:
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "base", "messages": QUESTION})
        assert response.status_code == 503 and "retry-after" in response.headers
        assert error_of(response)["code"] == "upstream_unavailable"
