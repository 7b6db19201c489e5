"""Real servers for tests: the gateway in a thread on a free port; vLLM and gateway processes (``core.processes``)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from core import embedded, processes
from core.processes import ChildProcess, free_port
from core.vllm_server import VllmServer
from gateway import Settings, create_app, server_config


class GatewayServer:
    """A gateway served by uvicorn in a background thread, reachable over real HTTP."""

    def __init__(self, settings: Settings, *, log_level: str = "warning") -> None:
        self.settings = settings.model_copy(update={"port": free_port(), "host": "127.0.0.1"})
        self.app = create_app(self.settings)
        config = server_config(self.app, self.settings, log_level=log_level, loop="asyncio", http="h11", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start(self) -> None:
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), what="the gateway's thread to start")
        if not self._server.started:
            raise RuntimeError("the gateway did not start; see the log above")

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
    """Poll an externally observable condition (a gateway seeing a change) with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class GatewayProcess:
    """A gateway in a process of its own (``quiver up --vllm-url``), for what a thread cannot show: kill -9."""

    url: str
    process: ChildProcess


@contextmanager
def gateway_process(env: dict[str, str], vllm_url: str, log_path: Path) -> Iterator[GatewayProcess]:
    """Start ``quiver up`` in front of a running vLLM with ``env`` (``QUIVER_*``) until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "quiver.cli", "up", "--vllm-url", vllm_url, "--port", str(port)]
    with processes.serving("the gateway", args, log_path, f"{url}/health", env=env, timeout_s=180, grace_s=60) as p:
        yield GatewayProcess(url, p)
