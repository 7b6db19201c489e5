"""A throwaway Redis server for tests: ``redis-server`` on 127.0.0.1, a free port, no persistence, gone after.

Use the ``redis_server`` session fixture (import it into a test module); it skips, saying why, where
``redis-server`` is not installed (``apt-get install redis-server``; ``scripts/test.sh`` does that), and fails
under CI.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.postgres import missing_server


@dataclass(frozen=True)
class RedisServer:
    """A running server; ``url`` is what ``QUIVER_REDIS_URL`` takes."""

    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
    port = _free_port()
    log = (root / "redis.log").open("w")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(root / 'redis.log').read_text()}")
            time.sleep(0.05)
        yield RedisServer(port)
    finally:
        process.terminate()
        process.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
