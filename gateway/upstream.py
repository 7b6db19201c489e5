"""Upstream servers (vLLM replicas, frontier APIs) as small classes around one pooled httpx client each.

Transport failures become typed Quiver errors in one place (``Upstream._translating``):
a refused connection is 503 with Retry-After while the server is starting or was up recently
(``unreachable_after_s``), and 502 once it has been unreachable for longer; a timeout is 504;
anything else that breaks the exchange is 502. Client-facing messages leave out the upstream's
address; the log has it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx

from core.errors import InvalidRequest, QuiverError, Unavailable, UpstreamError, UpstreamTimeout
from gateway.observability import Tracing, outbound_headers

log = logging.getLogger("quiver.upstream")

ReplicaState = Literal["starting", "up", "down"]

_JSON = {"content-type": "application/json"}
# Seconds a client should wait before retrying while vLLM is unreachable or starting.
RETRY_AFTER_S = 2.0
# vLLM's server drops idle keep-alive connections after 5 s; reusing one just as it closes
# fails the request, so the pool lets them go first.
_KEEPALIVE_S = 4.0


def upstream_error(status: int, body: bytes, label: str = "vLLM") -> QuiverError:
    """Turn an upstream's error answer into the matching Quiver error, keeping its message."""
    message, param = body.decode("utf-8", "replace").strip(), None
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            message = str(parsed["error"].get("message") or message)
            param = parsed["error"].get("param")
        elif isinstance(parsed, dict) and "detail" in parsed:
            message = str(parsed["detail"])
    except ValueError:
        pass
    if status in (429, 503):
        return Unavailable(f"{label} is busy: {message}", retry_after=RETRY_AFTER_S, code="upstream_busy")
    if 400 <= status < 500:
        error = InvalidRequest(message, param=param if isinstance(param, str) else None)
        error.status_code = status
        return error
    return UpstreamError(f"{label} answered {status}: {message}")


def unreachable(exc: QuiverError) -> bool:
    """Whether ``exc`` says the upstream is not taking requests at all (refused or dropped connections), rather
    than that it answered badly."""
    return exc.code in ("upstream_unavailable", "upstream_unreachable")


# Sends of one request over pooled connections that turn out dead, before giving up.
_SEND_ATTEMPTS = 4


class Upstream:
    """An OpenAI-compatible server: forwarding requests and relaying answers, with typed errors."""

    label = "upstream"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        unreachable_after_s: float = 300.0,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.state: ReplicaState = "starting"
        self._unreachable_after_s = unreachable_after_s
        self._last_up = time.monotonic()
        self._urls: dict[str, httpx.URL] = {}
        self._headers = _JSON | (headers or {})
        self.tracing = Tracing()  # off; the app hands its own over when tracing is on
        self._probe_timeout = httpx.Timeout(connect_timeout_s)
        # Keep-alive pool sized for high concurrency: a new TCP handshake per request is what
        # makes naive proxies slow.
        self._client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=_KEEPALIVE_S),
            transport=transport,
            headers=headers,
        )
        self._extensions = {"timeout": self._client.timeout.as_dict()}

    def mark_up(self) -> None:
        """Record a successful health check."""
        self.state = "up"
        self._last_up = time.monotonic()

    @contextmanager
    def _translating(self, action: str) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("%s at %s: %s failed: %s", self.label, self.url, action, exc)
            down_for = time.monotonic() - self._last_up
            if down_for > self._unreachable_after_s:
                raise UpstreamError(
                    f"{self.label} has been unreachable for {down_for:.0f} s ({action})", code="upstream_unreachable"
                ) from exc
            raise Unavailable(
                f"{self.label} is not accepting connections ({action}); it may be starting or restarting",
                retry_after=RETRY_AFTER_S,
                code="upstream_unavailable",
            ) from exc
        except httpx.TimeoutException as exc:
            log.warning("%s at %s: %s timed out", self.label, self.url, action)
            raise UpstreamTimeout(f"{self.label} timed out ({action})") from exc
        except httpx.TransportError as exc:
            log.warning("%s at %s: %s failed: %r", self.label, self.url, action, exc)
            raise UpstreamError(f"{self.label} failed ({action}): {type(exc).__name__}") from exc

    def _url(self, path: str) -> httpx.URL:
        # A prebuilt absolute URL: httpx's build_request spends more merging URLs than sending.
        return self._urls.get(path) or self._urls.setdefault(path, httpx.URL(self.url + path))

    async def open(self, path: str, body: bytes) -> httpx.Response:
        """POST ``body`` and return the response with its body not yet read (for streaming)."""
        headers = self._headers | outbound_headers()
        with self.tracing.client_span(f"upstream POST {path}", headers, **{"server.address": self.url}):
            for attempt in range(1, _SEND_ATTEMPTS + 1):
                request = httpx.Request(
                    "POST", self._url(path), content=body, headers=headers, extensions=self._extensions
                )
                with self._translating(f"POST {path}"):
                    try:
                        response = await self._client.send(request, stream=True)
                    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                        # A pooled connection the upstream closed (it died or restarted) fails before any answer;
                        # the request never ran. Again on the next connection; the pool may hold several dead ones.
                        if attempt < _SEND_ATTEMPTS:
                            log.info(
                                "%s at %s: pooled connection dropped (%r); sending again", self.label, self.url, exc
                            )
                            continue
                        if isinstance(exc, httpx.RemoteProtocolError):
                            raise
                        raise Unavailable(
                            f"{self.label} closed the connection before answering ({path}); it may be restarting",
                            retry_after=RETRY_AFTER_S,
                            code="upstream_unavailable",
                        ) from exc
                break
        if response.status_code < 400:
            return response
        try:
            with self._translating(f"reading the error of POST {path}"):
                error_body = await response.aread()
        finally:
            await response.aclose()
        error = upstream_error(response.status_code, error_body, self.label)
        if isinstance(error, Unavailable) and (wait := _retry_after(response)) is not None:
            error.retry_after = wait
        raise error

    async def relay(self, response: httpx.Response) -> AsyncGenerator[bytes]:
        """Yield the upstream body chunk by chunk as it arrives, translating transport errors."""
        try:
            with self._translating("streaming the answer"):
                async for chunk in response.aiter_raw():
                    yield chunk
        finally:
            await response.aclose()

    async def read(self, response: httpx.Response) -> bytes:
        """Read a whole (non-streamed) upstream body."""
        try:
            with self._translating("reading the answer"):
                return await response.aread()
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    """The upstream's ``Retry-After`` in seconds (the delta-seconds form), if it sent one."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class VllmReplica(Upstream):
    """One vLLM server: forwarding, the runtime LoRA API, and what its last health check saw."""

    label = "vLLM"

    def __init__(
        self,
        url: str,
        *,
        name: str = "r0",
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        load_timeout_s: float = 60.0,
        unreachable_after_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            url,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
            unreachable_after_s=unreachable_after_s,
            transport=transport,
        )
        self.name = name
        self.served_model: str | None = None
        self.model_root: str | None = None
        self.max_model_len: int | None = None
        self._load_timeout = httpx.Timeout(load_timeout_s, connect=connect_timeout_s)

    async def load_adapter(self, lora_name: str, lora_path: str) -> None:
        """Load an adapter through vLLM's runtime LoRA API.

        vLLM may already hold the name, after a gateway restart. That is fine when it was loaded
        from the same directory; from another one (a registry reset in front of a running vLLM),
        the stale adapter is replaced, never served under the new version's name.
        """
        response = await self._lora_post("/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path})
        if response.status_code < 400:
            return
        if "already been loaded" not in response.text:
            raise self._lora_refusal("load", lora_name, response)
        held = next((m for m in await self.models() if m.get("id") == lora_name), None)
        if held is None or held.get("root") in (None, lora_path):
            return
        log.warning("vLLM holds %s from %s, not %s; loading it again", lora_name, held.get("root"), lora_path)
        await self.unload_adapter(lora_name)
        response = await self._lora_post("/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path})
        if response.status_code >= 400:
            raise self._lora_refusal("load", lora_name, response)

    async def unload_adapter(self, lora_name: str) -> None:
        """Unload an adapter; one vLLM no longer knows (400/404) is already where we want it."""
        response = await self._lora_post("/v1/unload_lora_adapter", {"lora_name": lora_name})
        if response.status_code >= 400 and response.status_code not in (400, 404):
            raise self._lora_refusal("unload", lora_name, response)

    async def _lora_post(self, path: str, payload: dict[str, str]) -> httpx.Response:
        with self._translating(f"POST {path}"):
            return await self._client.post(path, json=payload, timeout=self._load_timeout)

    @staticmethod
    def _lora_refusal(action: str, lora_name: str, response: httpx.Response) -> QuiverError:
        error = upstream_error(response.status_code, response.content)
        if isinstance(error, Unavailable):
            return error
        # The adapter was validated before vLLM saw it; a refusal now is vLLM's problem (or its files').
        message = error.message.removeprefix(f"vLLM answered {response.status_code}: ")
        return UpstreamError(f"vLLM refused to {action} {lora_name} ({response.status_code}): {message}")

    async def models(self) -> list[dict[str, Any]]:
        """vLLM's ``/v1/models`` entries; also remembers the base model's served name."""
        with self._translating("GET /v1/models"):
            response = await self._client.get("/v1/models", timeout=self._probe_timeout)
        if response.status_code != 200:
            raise upstream_error(response.status_code, response.content)
        try:
            data: list[dict[str, Any]] = response.json()["data"]
            base = next((m for m in data if m.get("parent") is None), None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"vLLM's /v1/models answer is not an OpenAI model list: {exc!r}") from exc
        if base is not None:
            self.served_model = self.served_model or str(base["id"])
            self.model_root = str(base.get("root") or base["id"])
            if isinstance(base.get("max_model_len"), int):
                self.max_model_len = base["max_model_len"]
        return data
