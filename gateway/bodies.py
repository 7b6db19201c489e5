"""Request bodies from untrusted clients: a size bound on every route, and JSON decoded with a nesting bound.

A body over the limit is refused with 413 from its ``Content-Length`` before a byte of it is read or,
sent without one, as soon as what arrived passes the limit. The multipart uploads are left to their
routes, which enforce their own, larger limits while spooling to disk (``gateway/uploads.py``).

``load_json`` refuses text nested deeper than ``MAX_JSON_DEPTH`` before Python's decoder, which recurses
once per level, meets it: thousands of levels would be a RecursionError, which is no client's answer.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import InvalidRequest, PayloadTooLarge
from gateway.protocol import error_response

# serde_json's default: far deeper than any request or JSON schema a person writes, and far below the
# interpreter's recursion limit (1000).
MAX_JSON_DEPTH = 128

# +1 for an opening bracket, -1 for a closing one, 0 for anything else.
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1
_QUOTE = ord('"')
# Scanned in slices of this size, so that the scan's own arrays stay small whatever the body's size.
_SCAN_BYTES = 1 << 20


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the UTF-8 JSON text ``raw`` (brackets inside strings aside).

    One vectorised pass: a bracket is structure when an even number of quotes precede it, once the
    escaped backslashes and then the escaped quotes are taken out of the text.
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    deepest = depth = 0
    in_string = False
    for start in range(0, len(text), _SCAN_BYTES):
        part = np.frombuffer(text, dtype=np.uint8, count=min(_SCAN_BYTES, len(text) - start), offset=start)
        inside = np.bitwise_xor.accumulate(part == _QUOTE) ^ in_string
        steps = _STEPS[part]
        steps[inside] = 0
        levels = np.cumsum(steps, dtype=np.int64) + depth
        deepest, depth, in_string = max(deepest, int(levels.max())), int(levels[-1]), bool(inside[-1])
    return deepest


def load_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for a request body: 400 for text that is not JSON or nests deeper than ``max_depth``."""
    too_deep = InvalidRequest(f"request body nests arrays and objects more than {max_depth} levels deep")
    # Counting brackets is cheap and settles most bodies; the scan runs only when there are enough of them.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise too_deep
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # UTF-16 or UTF-32 text, which the byte scan does not read
        raise too_deep from None


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, having read at most ``max_bytes`` of it.

    ``spooled`` names the routes (method, path) that take larger bodies and bound them themselves.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, spooled: Collection[tuple[str, str]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.spooled = frozenset(spooled)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.spooled:
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            # The server delivers no more than the declared length: the body passes as it comes, when the app
            # asks for it (after authentication, say), or not at all.
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # Sent without a length: read here, up to the limit, rather than count as the app reads, since the app's
        # own body parsing (FastAPI's) would turn an error raised from receive() into a 400.
        first = await self._read(receive)
        if first is None:
            await self._refuse(scope, receive, send)
            return
        pending = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> Message | None:
        """The whole body as one message (or the disconnect that cut it short); None past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"request body is larger than the {self.max_bytes}-byte limit")
        await error_response(error)(scope, receive, send)
