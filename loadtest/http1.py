"""The benchmarks' load generator: one fixed HTTP/1.1 request, sent over keep-alive connections.

A general client costs more CPU per request than the servers it measures: httpx's pool spends about a
millisecond a request here, more with many connections, so at saturation the load generator, not the proxy,
set the pace. This one writes prepared bytes and reads no more of the answer than it takes to find its status
and its end (``Content-Length`` or chunked), about a tenth of that.
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import urlsplit

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Load:
    """``POST path`` with ``body`` to the server at ``url``, again and again, over connections kept open between
    rounds (``aclose`` closes them)."""

    def __init__(self, url: str, path: str, body: bytes, timeout_s: float = 600.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r}: the load generator speaks plain http to a host and port")
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s
        head = f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        self.request = f"{head}content-length: {len(body)}\r\n\r\n".encode() + body
        self._idle: list[Connection] = []

    async def round(self, n: int, concurrency: int) -> tuple[list[float], int, float]:
        """``n`` requests, ``concurrency`` in flight: the latencies (seconds) of the 200s, the other answers and
        failures, and the wall time."""
        latencies: list[float] = []
        errors = 0
        remaining = n

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                if await self._send():
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - started

    async def _send(self) -> bool:
        """One exchange; whether the answer was a 200. A kept connection the server has closed meanwhile (an idle
        timeout while the other sides had their turn) is replaced by a new one, as any client's pool does."""
        connection = await self._idle_connection()
        if connection is not None:
            status = await self._exchange(connection)
            if status is not None:
                return status == 200
        status = await self._exchange(None)
        return status == 200

    async def _idle_connection(self) -> Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection[0].at_eof():
                return connection
            await _close(connection)
        return None

    async def _exchange(self, connection: Connection | None) -> int | None:
        """The answer's status on ``connection`` (a new one when None); None when the exchange failed."""
        status: int | None = None
        keep = False
        try:
            async with asyncio.timeout(self.timeout_s):
                if connection is None:
                    connection = await asyncio.open_connection(self.host, self.port)
                connection[1].write(self.request)
                status, keep = await _answer(connection[0])
        except (OSError, EOFError, ValueError, TimeoutError):  # a failed exchange leaves nothing reusable
            pass
        if connection is not None:
            if keep:
                self._idle.append(connection)
            else:
                await _close(connection)
        return status

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection)


async def _close(connection: Connection) -> None:
    writer = connection[1]
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:  # the server closed it first
        pass


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one answer to its end; its status, and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    if _CHUNKED.search(head):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)  # the chunk and its CRLF
        await reader.readuntil(b"\r\n")  # no trailers, then the last CRLF
    elif (length := _LENGTH.search(head)) is not None:
        await reader.readexactly(int(length.group(1)))
    else:  # the body runs to the connection's end
        await reader.read()
        return status, False
    return status, _CLOSE.search(head) is None
