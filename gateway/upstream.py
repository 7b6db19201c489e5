"""vLLM replicas as small classes around one pooled httpx client each.

Transport failures become typed Quiver errors in one place (``_translate``): refused connection
-> 503 with Retry-After (vLLM is starting or restarting), timeout -> 504, anything else that
breaks the exchange -> 502.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx

from quiver.errors import InvalidRequest, QuiverError, Unavailable, UpstreamError, UpstreamTimeout

log = logging.getLogger("quiver.upstream")

ReplicaState = Literal["starting", "up", "down"]

_JSON = {"content-type": "application/json"}
# Seconds a client should wait before retrying while vLLM is unreachable or starting.
RETRY_AFTER_S = 2.0


@contextmanager
def _translate(url: str, action: str) -> Iterator[None]:
    try:
        yield
    except httpx.ConnectError as exc:
        raise Unavailable(
            f"vLLM at {url} is not accepting connections ({action}); it may be starting or restarting",
            retry_after=RETRY_AFTER_S,
            code="upstream_unavailable",
        ) from exc
    except httpx.ConnectTimeout as exc:
        raise Unavailable(
            f"vLLM at {url} did not accept the connection in time ({action})",
            retry_after=RETRY_AFTER_S,
            code="upstream_unavailable",
        ) from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"vLLM at {url} timed out ({action})") from exc
    except httpx.TransportError as exc:
        raise UpstreamError(f"vLLM at {url} failed ({action}): {type(exc).__name__}: {exc}") from exc


def upstream_error(url: str, status: int, body: bytes) -> QuiverError:
    """Turn a vLLM error answer into the matching Quiver error, keeping vLLM's message."""
    message, param = body.decode("utf-8", "replace").strip(), None
    try:
        import json

        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            message = str(parsed["error"].get("message") or message)
            param = parsed["error"].get("param")
        elif isinstance(parsed, dict) and "detail" in parsed:
            message = str(parsed["detail"])
    except ValueError:
        pass
    if status == 503:
        return Unavailable(f"vLLM at {url} is busy: {message}", retry_after=RETRY_AFTER_S)
    if 400 <= status < 500:
        error = InvalidRequest(message, param=param if isinstance(param, str) else None)
        error.status_code = status
        return error
    return UpstreamError(f"vLLM at {url} answered {status}: {message}")


class VllmReplica:
    """One vLLM server: forwarding, the runtime LoRA API, and what its last health check saw."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        load_timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.state: ReplicaState = "starting"
        self.served_model: str | None = None
        self.model_root: str | None = None
        self._urls: dict[str, httpx.URL] = {}
        self._load_timeout = httpx.Timeout(load_timeout_s, connect=connect_timeout_s)
        self._probe_timeout = httpx.Timeout(connect_timeout_s)
        # Keep-alive pool sized for high concurrency: a new TCP handshake per request is what
        # makes naive proxies slow.
        self._client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60),
            transport=transport,
        )
        self._extensions = {"timeout": self._client.timeout.as_dict()}

    async def open(self, path: str, body: bytes) -> httpx.Response:
        """POST ``body`` and return the response with its body not yet read (for streaming)."""
        # A prebuilt absolute URL: httpx's build_request spends more merging URLs than sending.
        url = self._urls.get(path) or self._urls.setdefault(path, httpx.URL(self.url + path))
        request = httpx.Request("POST", url, content=body, headers=_JSON, extensions=self._extensions)
        with _translate(self.url, f"POST {path}"):
            response = await self._client.send(request, stream=True)
        if response.status_code >= 400:
            with _translate(self.url, f"reading error of POST {path}"):
                error_body = await response.aread()
            await response.aclose()
            raise upstream_error(self.url, response.status_code, error_body)
        return response

    async def relay(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """Yield the upstream body chunk by chunk as it arrives, translating transport errors."""
        try:
            with _translate(self.url, "streaming the answer"):
                async for chunk in response.aiter_raw():
                    yield chunk
        finally:
            await response.aclose()

    async def read(self, response: httpx.Response) -> bytes:
        """Read a whole (non-streamed) upstream body."""
        try:
            with _translate(self.url, "reading the answer"):
                return await response.aread()
        finally:
            await response.aclose()

    async def load_adapter(self, lora_name: str, lora_path: str) -> None:
        """Load an adapter through vLLM's runtime LoRA API; an already loaded name is fine."""
        await self._lora_call("/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path})

    async def unload_adapter(self, lora_name: str) -> None:
        """Unload an adapter; one vLLM no longer knows is fine."""
        await self._lora_call("/v1/unload_lora_adapter", {"lora_name": lora_name})

    async def _lora_call(self, path: str, payload: dict[str, str]) -> None:
        with _translate(self.url, f"POST {path}"):
            response = await self._client.post(path, json=payload, timeout=self._load_timeout)
        if response.status_code < 400:
            return
        text = response.text
        # After a gateway restart vLLM may already hold the name (load: 400 "already been
        # loaded") or may have forgotten it (unload: 400/404); both mean the goal is reached.
        if "already been loaded" in text or (
            path.endswith("unload_lora_adapter") and response.status_code in (400, 404)
        ):
            return
        error = upstream_error(self.url, response.status_code, response.content)
        if isinstance(error, InvalidRequest):
            # The adapter was validated before vLLM saw it; a refusal now is vLLM's problem.
            raise UpstreamError(f"vLLM refused {path} for {payload['lora_name']}: {error.message}")
        raise error

    async def models(self) -> list[dict[str, Any]]:
        """vLLM's ``/v1/models`` entries; also remembers the base model's served name."""
        with _translate(self.url, "GET /v1/models"):
            response = await self._client.get("/v1/models", timeout=self._probe_timeout)
        if response.status_code != 200:
            raise upstream_error(self.url, response.status_code, response.content)
        data: list[dict[str, Any]] = response.json()["data"]
        for entry in data:
            if entry.get("parent") is None:
                self.served_model = self.served_model or str(entry["id"])
                self.model_root = str(entry.get("root") or entry["id"])
                break
        return data

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
