"""API keys and tenants: what a key may do (scopes), whose adapters it sees (its tenant), and its limits.

A key reads ``qk_<id>_<secret>``. The id is public (it names the key in listings, logs and usage);
only the secret's SHA-256 is stored, so the key is shown once, when it is created. Keys are random
256-bit secrets, so a plain SHA-256 is as strong as a slow password hash here and costs microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

INFERENCE = "inference"
ADAPTERS_WRITE = "adapters:write"
FINE_TUNE = "fine-tune"
ADMIN = "admin"
SCOPES = (INFERENCE, ADAPTERS_WRITE, FINE_TUNE, ADMIN)

PREFIX = "qk"
TENANT_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_KEY_RULE = re.compile(rf"{PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})")


@dataclass(frozen=True)
class Tenant:
    """A tenant and its limits per minute (None: unlimited)."""

    name: str
    requests_per_min: int | None
    tokens_per_min: int | None
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: everything but its secret."""

    id: str
    tenant: str
    name: str | None
    scopes: tuple[str, ...]
    requests_per_min: int | None
    tokens_per_min: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    secret_sha256: str

    def state(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``token`` is the only time its secret exists outside the caller."""

    key: ApiKey
    token: str


def new_secret() -> tuple[str, str, str]:
    """A fresh key: its id, its full token and the SHA-256 of its secret."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{PREFIX}_{key_id}_{secret}", _sha256(secret)


def parse_token(token: str) -> tuple[str, str] | None:
    """The id and secret of a well-formed token; None for anything else."""
    match = _KEY_RULE.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes, deduplicated in canonical order; ValueError naming an unknown one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


class KeyRing:
    """An immutable snapshot of every key and tenant, for checking tokens without touching the database."""

    def __init__(self, keys: Iterable[ApiKey], tenants: Iterable[Tenant], revision: int = 0) -> None:
        self.revision = revision
        self.keys: Mapping[str, ApiKey] = MappingProxyType({k.id: k for k in keys})
        self.tenants: Mapping[str, Tenant] = MappingProxyType({t.name: t for t in tenants})

    def __bool__(self) -> bool:
        """Whether any key was ever created: with none, the gateway runs open on loopback."""
        return bool(self.keys)

    def verify(self, token: str) -> ApiKey | None:
        """The stored key ``token`` belongs to, whatever its state; None when it is no key of ours."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key = self.keys.get(parsed[0])
        if key is None or not hmac.compare_digest(key.secret_sha256, _sha256(parsed[1])):
            return None
        return key
