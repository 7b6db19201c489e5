"""An OpenAI-shaped upstream that answers at once, to measure the gateway's own cost.

Chat and text completions answer one token, as JSON or, asked with ``"stream": true``, as server-sent events.
It also speaks vLLM's runtime LoRA API (load, unload, loaded adapters in ``/v1/models``), so the
gateway can route to registry adapters through it without a model behind it.

Run: ``python -m loadtest.instant_upstream --port 8101``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from core import processes

MODEL = "instant"


def _completion(model: str, *, chat: bool = True) -> bytes:
    choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
    choice |= {"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
    return json.dumps(
        {
            "id": "chatcmpl-instant" if chat else "cmpl-instant",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
    ).encode()


def _events(model: str, *, chat: bool) -> list[bytes]:
    """The streamed form of ``_completion``: one token, the finish, the usage, then ``[DONE]``."""
    head = {
        "id": "chatcmpl-instant" if chat else "cmpl-instant",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    token: dict[str, object] = {"delta": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"}
    finish: dict[str, object] = {"delta": {}} if chat else {"text": ""}
    usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
    chunks = [
        head | {"choices": [{"index": 0, "finish_reason": None} | token]},
        head | {"choices": [{"index": 0, "finish_reason": "length"} | finish]},
        head | {"choices": [], "usage": usage},
    ]
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


async def _stream(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _card(model_id: str, root: str, parent: str | None) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "bench", "root": root, "parent": parent}


async def chat(request: Request) -> Response:
    return await _answer(request, chat=True)


async def completions(request: Request) -> Response:
    return await _answer(request, chat=False)


async def _answer(request: Request, *, chat: bool) -> Response:
    body = json.loads(await request.body())
    model = str(body.get("model"))
    if body.get("stream"):
        return StreamingResponse(_stream(_events(model, chat=chat)), media_type="text/event-stream")
    return Response(_completion(model, chat=chat), media_type="application/json")


async def models(request: Request) -> JSONResponse:
    loras: dict[str, str] = request.app.state.loras
    cards = [_card(MODEL, MODEL, None), *(_card(name, path, MODEL) for name, path in loras.items())]
    return JSONResponse({"object": "list", "data": cards})


async def load_lora_adapter(request: Request) -> Response:
    body = json.loads(await request.body())
    loras: dict[str, str] = request.app.state.loras
    name = str(body["lora_name"])
    if name in loras:  # vLLM's wording, which the gateway recognises
        return JSONResponse({"message": f"The lora adapter '{name}' has already been loaded."}, status_code=400)
    loras[name] = str(body["lora_path"])
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    body = json.loads(await request.body())
    if request.app.state.loras.pop(str(body["lora_name"]), None) is None:
        return JSONResponse({"message": f"The lora adapter '{body['lora_name']}' cannot be found."}, status_code=404)
    return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("")


def create_app() -> Starlette:
    """The upstream, holding no adapters yet."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
            Route("/health", health),
        ]
    )
    app.state.loras = {}
    return app


def start(stack: ExitStack, work: Path) -> str:
    """Run the upstream in a process of its own on a free port until ``stack`` closes; its URL."""
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "loadtest.instant_upstream", "--port", str(port)]
    stack.enter_context(processes.serving("the instant upstream", args, work / "instant.log", f"{url}/health"))
    return url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
    )


if __name__ == "__main__":
    main()
