"""An OpenAI-shaped upstream that answers at once, to measure the gateway's own cost.

Run: ``python -m loadtest.instant_upstream --port 8101``.
"""

from __future__ import annotations

import argparse
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

MODEL = "instant"


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-instant",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
    ).encode()


async def chat(request: Request) -> Response:
    body = json.loads(await request.body())
    return Response(_completion(str(body.get("model"))), media_type="application/json")


async def models(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "bench", "root": MODEL, "parent": None}
            ],
        }
    )


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop", http="httptools", access_log=False
    )


if __name__ == "__main__":
    main()
