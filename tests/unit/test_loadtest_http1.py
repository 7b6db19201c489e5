"""The benchmarks' load generator (``loadtest.http1``) against real servers: the instant upstream (answers with a
length) and the floor in front of it (streams relayed chunked). Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from core.processes import free_port
from loadtest import floor, instant_upstream
from loadtest.http1 import Load

CHAT = {"model": "instant", "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    work = tmp_path_factory.mktemp("http1")
    with ExitStack() as stack:
        upstream = instant_upstream.start(stack, work)
        url, _ = floor.start(stack, upstream, work, "http1")
        yield upstream, url


def run(url: str, path: str, body: dict[str, object], n: int, concurrency: int) -> tuple[int, int]:
    """How many 200s and how many other answers or failures two rounds of ``n`` requests got."""

    async def go() -> tuple[int, int]:
        load = Load(url, path, json.dumps(body).encode())
        latencies, errors, _ = await load.round(n, concurrency)
        second, more_errors, _ = await load.round(n, concurrency)  # on the connections the first round left open
        await load.aclose()
        return len(latencies) + len(second), errors + more_errors

    return asyncio.run(go())


def test_answers_with_a_length_are_read_to_their_end_over_kept_connections(servers: tuple[str, str]) -> None:
    upstream, _ = servers
    assert run(upstream, "/v1/chat/completions", CHAT, 20, 4) == (40, 0)


def test_chunked_answers_are_read_to_their_end(servers: tuple[str, str]) -> None:
    _, through_floor = servers
    assert run(through_floor, "/v1/chat/completions", CHAT | {"stream": True}, 10, 2) == (20, 0)


def test_other_statuses_and_unreachable_servers_count_as_failures(servers: tuple[str, str]) -> None:
    upstream, _ = servers
    assert run(upstream, "/v1/embeddings", CHAT, 3, 1) == (0, 6)
    assert run(f"http://127.0.0.1:{free_port()}", "/v1/chat/completions", CHAT, 2, 1) == (0, 4)


def test_only_plain_http_to_a_host_and_port_is_spoken() -> None:
    with pytest.raises(ValueError, match="plain http"):
        Load("https://example.com:443", "/", b"")


def test_a_kept_connection_the_server_closed_meanwhile_is_replaced() -> None:
    # A server that closes every connection after one answer without saying so, as an idle timeout does.
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def go() -> tuple[int, int]:
        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        load = Load(f"http://127.0.0.1:{port}", "/", b"{}")
        latencies, errors, _ = await load.round(5, 1)
        await load.aclose()
        server.close()
        await server.wait_closed()
        return len(latencies), errors

    assert asyncio.run(go()) == (5, 0)
