"""The one exception tree of Quiver.

Every error a user can see is a ``QuiverError``; the gateway renders it as the OpenAI error
body ``{"error": {"message", "type", "param", "code"}}`` with ``status_code``.

    QuiverError                500 internal_error
    ├── InvalidRequest         400 invalid_request_error  (malformed body, bad parameter)
    │   ├── InvalidArchive     400 invalid_archive        (unsafe or unreadable upload)
    │   ├── InvalidAdapter     422 invalid_adapter        (not servable by vLLM on this base)
    │   ├── PayloadTooLarge    413 payload_too_large
    │   └── LengthRequired     411 length_required        (an upload without Content-Length)
    ├── Unauthorized           401 invalid_api_key        (no key, an unknown, revoked or expired one)
    ├── PermissionDenied       403 permission_denied      (the key lacks the scope the call needs)
    ├── NotFound               404 not_found
    │   └── ModelNotFound      404 model_not_found
    ├── Conflict               409 conflict               (e.g. deleting an aliased version)
    ├── RateLimited            429 rate_limit_exceeded + Retry-After (a key's or tenant's per-minute limit)
    ├── Unavailable            503 + Retry-After          (starting, loading, busy)
    ├── NotInstalled           501 not_installed          (a part of Quiver this install lacks: an extra)
    └── UpstreamError          502 upstream_error         (vLLM answered badly or dropped us)
        ├── UpstreamTimeout    504 upstream_timeout
        └── ProcessFailed      502 process_failed         (a process Quiver started exited or never became ready)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class QuiverError(Exception):
    """Base of every error Quiver reports; carries what the OpenAI error body needs."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str = "internal_error"
    headers: Mapping[str, str] = MappingProxyType({})  # sent with the error body (rate-limit state)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-style error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(QuiverError):
    """The client sent something malformed or invalid."""

    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class InvalidArchive(InvalidRequest):
    """An uploaded archive is unsafe (links, absolute paths, ``..``) or unreadable."""

    default_code = "invalid_archive"


class InvalidAdapter(InvalidRequest):
    """An adapter that vLLM could not serve on this base model."""

    status_code = 422
    default_code = "invalid_adapter"


class PayloadTooLarge(InvalidRequest):
    """An upload or archive member over the configured size limits."""

    status_code = 413
    default_code = "payload_too_large"


class LengthRequired(InvalidRequest):
    """An upload that does not say how large it is, so its size cannot be checked up front."""

    status_code = 411
    default_code = "length_required"


class Unauthorized(QuiverError):
    """No usable API key: missing, unknown, revoked or expired."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(QuiverError):
    """The key is valid but may not do this (a scope it lacks, a shared adapter it may not change)."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(QuiverError):
    """A named thing does not exist."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """The requested model is neither the base nor a registered adapter version or alias."""

    default_code = "model_not_found"


class Conflict(QuiverError):
    """The request conflicts with current state."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class RateLimited(QuiverError):
    """A key or its tenant used its requests or tokens for this minute; ``headers`` say which and until when."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: Mapping[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.headers = dict(headers)


class Unavailable(QuiverError):
    """Temporarily unable to serve: the upstream is starting, an adapter is loading, or we are full."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class NotInstalled(QuiverError):
    """This install lacks an optional part of Quiver (the gateway-only install has no ML stack); the message names
    the extra that brings it."""

    status_code = 501
    error_type = "not_implemented"
    default_code = "not_installed"


class UpstreamError(QuiverError):
    """vLLM (or another upstream) failed in a way the client cannot fix."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    status_code = 504
    default_code = "upstream_timeout"


class ProcessFailed(UpstreamError):
    """A process Quiver started (vLLM, a gateway, locust) exited or did not become ready; the message names its log."""

    default_code = "process_failed"
