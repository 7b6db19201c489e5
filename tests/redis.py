"""A throwaway Redis server for tests: ``redis-server`` on 127.0.0.1, a free port, no persistence, gone after.

Use the ``redis_server`` session fixture (import it into a test module); it skips, saying why, where
``redis-server`` is not installed (``apt-get install redis-server``; ``scripts/test.sh`` does that), and fails
under CI.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core import processes
from tests.postgres import missing_server


@dataclass(frozen=True)
class RedisServer:
    """A running server; ``url`` is what ``QUIVER_REDIS_URL`` takes."""

    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the test session; skips where ``redis-server`` is not installed."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        missing_server("redis-server not found (apt-get install redis-server)")
    root = Path(tempfile.mkdtemp(prefix="quiver-redis-"))
    port = processes.free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    process = processes.start("redis-server", args, root / "redis.log")
    try:
        process.wait_ready(lambda: _answers(port), 30, condition="answering PING", interval_s=0.05)
        yield RedisServer(port)
    finally:
        process.stop(grace_s=10)
        shutil.rmtree(root, ignore_errors=True)
