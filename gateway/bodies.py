"""Request bodies from untrusted clients: a size bound on every route.

A body over the limit is refused with 413 from its ``Content-Length`` before a byte of it is read or,
sent without one, as soon as what arrived passes the limit. The multipart uploads are left to their
routes, which enforce their own, larger limits while spooling to disk (``gateway/uploads.py``).
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import PayloadTooLarge
from gateway.protocol import error_response


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
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Read here rather than counting as the app reads: the app's own body parsing (FastAPI's) would turn
        # an error raised from receive() into a 400.
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
