"""Keys, tenants and usage in the registry's database: stores over its one engine, beside the adapter registry.

A new or revoked key is a registry change (it bumps the revision, so gateways reload their key rings); a
usage count is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from access import keys
from access.keys import ApiKey, KeyRing, NewKey, Tenant
from access.usage import UsageRow
from adapters import db
from adapters.registry import UNSET, Unset
from core.errors import InvalidRequest, NotFound


class KeyStore:
    """API keys and their tenants. Synchronous; the gateway calls it from a thread."""

    def __init__(self, database: db.Database) -> None:
        self._db = database

    def create_key(
        self,
        tenant: str,
        scopes: Iterable[str],
        *,
        name: str | None = None,
        requests_per_min: int | None = None,
        tokens_per_min: int | None = None,
        expires_at: datetime | None = None,
    ) -> NewKey:
        """A new API key of ``tenant`` (created if new); the returned token is the only copy of its secret."""
        if not keys.TENANT_RULE.fullmatch(tenant):
            raise InvalidRequest(
                f"invalid tenant {tenant!r}: use 1-64 characters a-z, 0-9, '.', '_', '-', "
                "starting with a letter or digit",
                param="tenant",
            )
        try:
            checked = keys.check_scopes(scopes)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="scopes") from None
        for value, param in ((requests_per_min, "requests_per_min"), (tokens_per_min, "tokens_per_min")):
            if value is not None and value < 1:
                raise InvalidRequest(f"{param} must be at least 1 (leave it out for no limit)", param=param)
        now = datetime.now(UTC)
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at is in the past", param="expires_at")
        key_id, token, sha256 = keys.new_secret()

        def work(conn: Connection) -> NewKey:
            if conn.scalar(select(db.tenants.c.name).where(db.tenants.c.name == tenant)) is None:
                conn.execute(insert(db.tenants).values(name=tenant, created_at=now))
            row = {
                "id": key_id,
                "secret_sha256": sha256,
                "tenant": tenant,
                "name": name,
                "scopes": list(checked),
                "requests_per_min": requests_per_min,
                "tokens_per_min": tokens_per_min,
                "created_at": now,
                "expires_at": expires_at,
                "revoked_at": None,
            }
            conn.execute(insert(db.api_keys).values(**row))
            return keys.NewKey(_api_key(row), token)

        return self._db.write(work)

    def api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant``), oldest first, revoked and expired ones included."""
        query = select(db.api_keys).order_by(db.api_keys.c.created_at, db.api_keys.c.id)
        if tenant is not None:
            query = query.where(db.api_keys.c.tenant == tenant)
        with self._db.read() as conn:
            return [_api_key(row) for row in conn.execute(query).mappings()]

    def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key at once (gateways see it at their next registry refresh); NotFound if there is none."""

        def work(conn: Connection) -> ApiKey:
            k = db.api_keys
            row = conn.execute(select(k).where(k.c.id == key_id)).mappings().first()
            if row is None:
                raise NotFound(f"no API key with id '{key_id}'", param="key_id")
            if row["revoked_at"] is None:
                conn.execute(update(k).where(k.c.id == key_id).values(revoked_at=datetime.now(UTC)))
            return _api_key(conn.execute(select(k).where(k.c.id == key_id)).mappings().one())

        return self._db.write(work)

    def set_tenant_limits(
        self, tenant: str, *, requests_per_min: int | None | Unset = UNSET, tokens_per_min: int | None | Unset = UNSET
    ) -> Tenant:
        """Change a tenant's per-minute limits (None: unlimited; left out: unchanged); NotFound if it has no keys."""

        def work(conn: Connection) -> Tenant:
            t = db.tenants
            values = {
                k: v
                for k, v in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min))
                if not isinstance(v, Unset)
            }
            for param, value in values.items():
                if value is not None and value < 1:
                    raise InvalidRequest(f"{param} must be at least 1 (or none for no limit)", param=param)
            if values:
                conn.execute(update(t).where(t.c.name == tenant).values(**values))
            row = conn.execute(select(t).where(t.c.name == tenant)).mappings().first()
            if row is None:
                raise NotFound(f"tenant '{tenant}' does not exist (it is made with its first key)", param="tenant")
            return _tenant(row)

        return self._db.write(work)

    def key_ring(self) -> KeyRing:
        """Every key and tenant, for checking tokens in memory, tagged with the revision it was read at."""
        with self._db.read() as conn:
            found = [_api_key(r) for r in conn.execute(select(db.api_keys)).mappings()]
            tenants = [_tenant(r) for r in conn.execute(select(db.tenants)).mappings()]
            return KeyRing(found, tenants, self._db.revision(conn))


class UsageStore:
    """Requests and tokens per minute, tenant, key and what served them. Synchronous, like ``KeyStore``."""

    def __init__(self, database: db.Database) -> None:
        self._db = database

    def record_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add counts to the per-minute usage table; not a registry change, so the revision stays."""
        if not rows:
            return
        u = db.usage
        with self._db.write_unversioned() as conn:
            upsert = db.upsert(conn, u)
            for row in rows:
                statement = upsert.values(**row.as_dict()).on_conflict_do_update(
                    index_elements=["minute", "tenant", "key_id", "served_by"],
                    set_={c: u.c[c] + upsert.excluded[c] for c in UsageRow.COUNTS},
                )
                conn.execute(statement)

    def usage(
        self,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        served_by: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        """Usage per minute, key, tenant and what served it; every filter given must match (``served_by``:
        ``name@vN`` exactly, or ``name`` for all of an adapter's versions)."""
        u = db.usage
        query = select(u).order_by(u.c.minute, u.c.tenant, u.c.key_id, u.c.served_by)
        if tenant is not None:
            query = query.where(u.c.tenant == tenant)
        if key_id is not None:
            query = query.where(u.c.key_id == key_id)
        if served_by is not None:
            query = query.where(
                (u.c.served_by == served_by) | u.c.served_by.startswith(f"{served_by}@", autoescape=True)
            )
        if since is not None:
            query = query.where(u.c.minute >= since)
        if until is not None:
            query = query.where(u.c.minute < until)
        with self._db.read() as conn:
            return [UsageRow.from_row(r) for r in conn.execute(query).mappings()]


def _api_key(row: Mapping[Any, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        scopes=tuple(row["scopes"]),
        requests_per_min=row["requests_per_min"],
        tokens_per_min=row["tokens_per_min"],
        created_at=db.utc(row["created_at"]),
        expires_at=db.utc(row["expires_at"]) if row["expires_at"] is not None else None,
        revoked_at=db.utc(row["revoked_at"]) if row["revoked_at"] is not None else None,
        secret_sha256=row["secret_sha256"],
    )


def _tenant(row: Mapping[Any, Any]) -> Tenant:
    return Tenant(row["name"], row["requests_per_min"], row["tokens_per_min"], db.utc(row["created_at"]))
