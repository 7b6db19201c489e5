"""Who is calling: an API key resolved to a ``Principal`` (its tenant, scopes and limits).

Keys live in the registry (``quiver keys create``); the gateway checks them against its in-memory
``KeyRing``, refreshed with the registry snapshot, so a check never touches the database. With no
key at all and no ``QUIVER_ADMIN_KEY``, the gateway is open, but only to clients on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request

from access.keys import ADMIN, SCOPES, ApiKey, KeyRing
from core.errors import PermissionDenied, Unauthorized

ADMIN_KEY_ID = "admin"  # how the QUIVER_ADMIN_KEY shows in logs, usage and metrics


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; None means unlimited."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None


@dataclass(frozen=True)
class Principal:
    """The caller of one request.

    ``key_id`` is None when the gateway runs open (no keys configured; loopback only). ``tenant`` is the
    key's tenant, or ``OPEN_TENANT`` when open. ``key_limits`` and ``tenant_limits`` are what the rate
    limiter enforces for the key and for its whole tenant.
    """

    key_id: str | None
    tenant: str
    scopes: frozenset[str]
    key_limits: Limits = Limits()
    tenant_limits: Limits = Limits()

    @property
    def visible_tenant(self) -> str | None:
        """The tenant whose adapters (with the shared ones) this caller sees; None: every tenant's."""
        return None if self.key_id is None or ADMIN in self.scopes else self.tenant

    @property
    def is_admin(self) -> bool:
        """Open gateways and admin keys may do everything, across tenants."""
        return self.key_id is None or ADMIN in self.scopes


OPEN_TENANT = "open"
OPEN = Principal(key_id=None, tenant=OPEN_TENANT, scopes=frozenset(SCOPES))
ADMIN_PRINCIPAL = Principal(key_id=ADMIN_KEY_ID, tenant=ADMIN_KEY_ID, scopes=frozenset(SCOPES))


def principal_of(request: Request) -> Principal:
    """The request's principal, set by authentication; the open principal where none was set."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal if principal is not None else OPEN


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bearer_token(request: Request) -> str | None:
    """The key the client sent: ``Authorization: Bearer KEY`` (what the OpenAI client sends), or ``api-key``."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip() or None
    return request.headers.get("api-key") or None


class Authenticator:
    """Checks a request's key against the current KeyRing and the admin key; builds its Principal."""

    def __init__(self, keys: Callable[[], KeyRing], admin_key: str | None) -> None:
        self._keys = keys
        self._admin_key = admin_key
        self._principals: tuple[KeyRing, dict[str, Principal]] | None = None

    @property
    def open(self) -> bool:
        """True while no key exists and no admin key is configured."""
        return not self._admin_key and not self._keys()

    def authenticate(self, request: Request, scopes: tuple[str, ...]) -> Principal:
        """The caller, if its key holds one of ``scopes`` (admin holds all); 401 or 403 otherwise."""
        principal = self._principal(request)
        if not principal.is_admin and not principal.scopes.intersection(scopes):
            raise PermissionDenied(
                f"this API key lacks the scope for this call: it needs {' or '.join(scopes)}; "
                f"it has {', '.join(sorted(principal.scopes))}"
            )
        request.state.principal = principal
        return principal

    def _principal(self, request: Request) -> Principal:
        ring = self._keys()
        if not ring and not self._admin_key:
            client = request.client.host if request.client else None
            if not is_loopback(client):
                raise Unauthorized(
                    "this gateway has no API keys yet and answers only on loopback; create one with "
                    "`quiver keys create` and send it as `Authorization: Bearer <key>`"
                )
            return OPEN
        token = bearer_token(request)
        if token is None:
            raise Unauthorized("missing API key: send it as `Authorization: Bearer <key>`")
        if self._admin_key and hmac.compare_digest(token.encode(), self._admin_key.encode()):
            return ADMIN_PRINCIPAL
        key = ring.verify(token)
        if key is None:
            raise Unauthorized("invalid API key")
        state = key.state(datetime.now(UTC))
        if state != "active":
            raise Unauthorized(f"API key {key.id} is {state}", code=f"{state}_api_key")
        return self._cached(ring, key)

    def _cached(self, ring: KeyRing, key: ApiKey) -> Principal:
        # One Principal per key and ring: the ring is immutable, so nothing in it can go stale.
        if self._principals is None or self._principals[0] is not ring:
            self._principals = (ring, {})
        cache = self._principals[1]
        principal = cache.get(key.id)
        if principal is None:
            tenant = ring.tenants.get(key.tenant)
            principal = cache[key.id] = Principal(
                key_id=key.id,
                tenant=key.tenant,
                scopes=frozenset(key.scopes),
                key_limits=Limits(key.requests_per_min, key.tokens_per_min),
                tenant_limits=Limits(tenant.requests_per_min, tenant.tokens_per_min) if tenant else Limits(),
            )
        return principal


def requires(*scopes: str) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency admitting keys with one of ``scopes``; it leaves the Principal on the request."""

    async def dependency(request: Request) -> Principal:
        authenticator: Authenticator = request.app.state.gateway.auth
        return authenticator.authenticate(request, scopes)

    return dependency
