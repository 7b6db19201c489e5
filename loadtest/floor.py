"""The floor: the leanest OpenAI passthrough, which the gateway's own cost is measured against.

Starlette with one pooled ``httpx.AsyncClient``, served by uvicorn on uvloop and httptools with the access log
off. It relays ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` to one upstream as
bytes (a server-sent event stream chunk by chunk as it arrives) and does nothing else: no routing, no checks,
no metrics. Whatever the gateway spends beyond it is the price of what the gateway does.

Run: ``python -m loadtest.floor --port 8102 --upstream http://127.0.0.1:8101``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from core import processes

EVENT_STREAM = "text/event-stream"


async def relay(request: Request) -> Response:
    """Send the request on as it came (path, body, content type) and the answer back as it comes."""
    client: httpx.AsyncClient = request.app.state.upstream
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    outgoing = client.build_request(request.method, request.url.path, content=await request.body(), headers=headers)
    answer = await client.send(outgoing, stream=True)
    media_type = answer.headers.get("content-type")
    if media_type is not None and media_type.startswith(EVENT_STREAM):
        return StreamingResponse(
            answer.aiter_raw(), answer.status_code, media_type=media_type, background=BackgroundTask(answer.aclose)
        )
    return Response(await answer.aread(), answer.status_code, media_type=media_type)


def create_app(upstream: str, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The passthrough to ``upstream``; ``transport`` replaces the network (tests)."""
    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=httpx.Timeout(600.0, connect=5.0),
        # The gateway's pool: the floor differs from it in what it does per request, not in its connections.
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60.0),
        headers={"accept-encoding": "identity"},  # bytes pass through as they are, never re-encoded
        transport=transport,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", relay, methods=["POST"]),
            Route("/v1/completions", relay, methods=["POST"]),
            Route("/v1/models", relay, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.upstream = client
    return app


def start(stack: ExitStack, upstream: str, work: Path, name: str) -> tuple[str, processes.ChildProcess]:
    """Run the floor in front of ``upstream`` in a process of its own until ``stack`` closes; its URL and process."""
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "loadtest.floor", "--port", str(port), "--upstream", upstream]
    # It has no health route of its own: it is ready when it relays the upstream's model list.
    process = stack.enter_context(processes.serving("the floor", args, work / f"floor-{name}.log", f"{url}/v1/models"))
    return url, process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
    )


if __name__ == "__main__":
    main()
