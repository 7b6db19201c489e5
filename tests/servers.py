"""Real servers for tests: the gateway in a thread on a free port (vLLM is started by conftest)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from core import embedded
from core.vllm_server import VllmServer, free_port
from gateway import Settings, create_app


class GatewayServer:
    """A gateway served by uvicorn in a background thread, reachable over real HTTP."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(update={"port": free_port(), "host": "127.0.0.1"})
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            loop="asyncio",
            http="h11",
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start; see the log above")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    @property
    def gateway(self):  # type: ignore[no-untyped-def]
        """The running parts, for white-box assertions (residency, metrics)."""
        return self.app.state.gateway

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of the gateway's Prometheus metrics (0 when absent)."""
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


@contextmanager
def running_vllm(model_dir: Path, log_path: Path, **options: Any) -> Iterator[VllmServer]:
    """A real vLLM serving the embedded model's name on a free port until the block ends."""
    server = VllmServer(
        model=str(model_dir), served_name=embedded.SERVED_NAME, port=free_port(), log_path=log_path, **options
    )
    server.start()
    try:
        server.wait_ready(timeout_s=600)
        yield server
    finally:
        server.stop()


@contextmanager
def running_gateway(settings: Settings) -> Iterator[GatewayServer]:
    """Start a gateway for the duration of the block."""
    server = GatewayServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll an externally observable condition (a server coming up) with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class GatewayProcess:
    """A gateway in a process of its own (``quiver up --vllm-url``), for what a thread cannot show: kill -9."""

    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def gateway_process(env: dict[str, str], vllm_url: str, log_path: Path) -> Iterator[GatewayProcess]:
    """Start ``quiver up`` in front of a running vLLM with ``env`` (``QUIVER_*``) until the block ends."""
    port = free_port()
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quiver.cli", "up", "--vllm-url", vllm_url, "--port", str(port)],
            env=dict(os.environ, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: process.poll() is None and healthy(url), timeout_s=180, what=f"a gateway ({log_path})")
            yield GatewayProcess(url, process)
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(60)
