"""A merged deployment takes its version's traffic while healthy; removing it returns traffic to the pool."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from adapters import DeploymentStore, Registry
from core.processes import alive, port_in_use
from core.vllm_server import vllm_command_line
from gateway import Settings
from tests.integration.openai_helpers import greedy, push
from tests.servers import running_gateway, wait_until


def quiver(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QUIVER_DATA_DIR=str(settings.data_dir), QUIVER_BASE_MODEL_PATH=str(settings.base_model_path))
    done = subprocess.run(
        [sys.executable, "-m", "quiver.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# Merging on a CPU and starting a dedicated vLLM take minutes when the cores are shared.
@pytest.mark.timeout(1200)
def test_merged_deployment_takes_traffic_and_gives_it_back_without_a_failed_request(
    settings: Settings, lora_dirs: tuple[Path, ...], unique_name: str
) -> None:
    lora = f"{unique_name}@v1"
    with running_gateway(settings) as gateway:
        push(gateway.url, unique_name, lora_dirs[0])
        pooled, headers = greedy(gateway.url, lora)
        assert headers["x-quiver-served-by"] == lora

        quiver(settings, "merge", lora)
        # Eager: vLLM on this CPU compiles every new model path for 60-100 s, and fails to reuse its compile cache.
        quiver(settings, "deploy", "merged", lora, "--vllm-arg=--enforce-eager")
        with Registry.open(settings.registry_url, settings.adapter_store) as registry:
            [deployment] = DeploymentStore.beside(registry).deployments()
        pid = deployment.pid
        removed = False
        assert pid is not None and deployment.served_model == lora
        try:
            # The CLI has exited; its vLLM serves the merged directory under name@vN, with LoRA off.
            command = vllm_command_line(pid)
            assert "--enable-lora" not in command and "--enforce-eager" in command
            assert (settings.data_dir / "logs" / f"deploy-{lora}.log").is_file()
            listed = quiver(settings, "deploy", "list")
            assert lora in listed.stdout and deployment.url in listed.stdout

            wait_until(
                lambda: greedy(gateway.url, lora)[1]["x-quiver-served-by"] == f"merged:{lora}",
                timeout_s=60,
                what="the gateway to route to the merged deployment",
            )
            merged, _ = greedy(gateway.url, lora)
            assert merged == pooled, "the merged model answers as base + adapter did"

            failures: list[str] = []
            served: set[str] = set()
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    body = {"model": lora, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
                    try:
                        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        served.add(r.headers["x-quiver-served-by"])

            worker = threading.Thread(target=traffic)
            worker.start()
            try:
                quiver(settings, "deploy", "rm", lora)
                removed = True
                wait_until(lambda: lora in served, timeout_s=60, what="traffic back on the LoRA pool")
            finally:
                stop.set()
                worker.join()
            assert failures == []
            assert served == {f"merged:{lora}", lora}
            # `deploy rm` also stopped the server it had started.
            assert not alive(pid)
            assert not port_in_use("127.0.0.1", int(deployment.url.rsplit(":", 1)[1]))
        finally:
            if not removed:  # the test failed before `deploy rm`: do not leave its vLLM running
                subprocess.run(
                    [sys.executable, "-m", "quiver.cli", "deploy", "rm", lora],
                    env=dict(os.environ, QUIVER_DATA_DIR=str(settings.data_dir)),
                    capture_output=True,
                    timeout=120,
                )
