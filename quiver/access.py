"""``quiver keys``, ``quiver tenants`` and ``quiver usage``: API keys, tenant limits and recorded usage.

They work on the registry's database directly (``QUIVER_DATABASE_URL``), as the gateways read it:
a new or revoked key takes effect on every gateway at its next registry refresh (about a second).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from access.keys import INFERENCE, SCOPES
from core.errors import QuiverError
from quiver.context import console, err, fail, open_database

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants and their rate limits.")


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for; made with its first key.")],
    scope: Annotated[
        list[str] | None, typer.Option(help=f"Repeatable; one of {', '.join(SCOPES)}. Default: {INFERENCE}.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for listings.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute for this key (default: no limit).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute for this key (prompt + max_tokens).")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after this many days.")] = None,
) -> None:
    """Create a key and print it: it is stored hashed and cannot be shown again."""
    from access.store import KeyStore

    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days is not None else None
    database = open_database()
    try:
        created = KeyStore(database).create_key(
            tenant, scope or [INFERENCE], name=name, requests_per_min=rpm, tokens_per_min=tpm, expires_at=expires
        )
    except QuiverError as exc:
        fail(exc)
    finally:
        database.close()
    key = created.key
    err.print(f"created key [bold]{key.id}[/] for tenant {key.tenant} with {', '.join(key.scopes)}")
    err.print("store it now; it is not shown again:")
    print(created.token)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """Every key: id, tenant, scopes, limits, state (active, revoked, expired). Never the secret."""
    from access.store import KeyStore

    database = open_database()
    try:
        found = KeyStore(database).api_keys(tenant)
    finally:
        database.close()
    now = datetime.now(UTC)
    table = Table("id", "tenant", "name", "scopes", "rpm", "tpm", "state", "created", "expires")
    for k in found:
        expires = f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "-"
        table.add_row(
            k.id,
            k.tenant,
            k.name or "",
            ", ".join(k.scopes),
            _limit(k.requests_per_min),
            _limit(k.tokens_per_min),
            k.state(now),
            f"{k.created_at:%Y-%m-%d %H:%M}",
            expires,
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id, as `quiver keys list` shows it.")]) -> None:
    """Revoke a key; every gateway refuses it from its next registry refresh on."""
    from access.store import KeyStore

    database = open_database()
    try:
        key = KeyStore(database).revoke_key(key_id)
    except QuiverError as exc:
        fail(exc)
    finally:
        database.close()
    console.print(f"revoked {key.id} (tenant {key.tenant})")


@tenants_app.command("limit")
def tenants_limit(
    tenant: str,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute for the whole tenant; 0: no limit.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute for the whole tenant; 0: no limit.")] = None,
) -> None:
    """Set a tenant's limits, shared by all its keys; options left out keep their value."""
    from access.store import KeyStore

    database = open_database()
    changes = {k: (v or None) for k, v in (("requests_per_min", rpm), ("tokens_per_min", tpm)) if v is not None}
    try:
        found = KeyStore(database).set_tenant_limits(tenant, **changes)
    except QuiverError as exc:
        fail(exc)
    finally:
        database.close()
    console.print(
        f"{found.name}: {_limit(found.requests_per_min)} requests/min, {_limit(found.tokens_per_min)} tokens/min"
    )


def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only this target: NAME (every version) or NAME@vN.")] = None,
    hours: Annotated[float, typer.Option(help="How far back to look.")] = 24.0,
) -> None:
    """Requests, errors and tokens per minute, tenant, key and what served them."""
    from access.store import UsageStore

    database = open_database()
    try:
        rows = UsageStore(database).usage(
            tenant=tenant, key_id=key, served_by=adapter, since=datetime.now(UTC) - timedelta(hours=hours)
        )
    finally:
        database.close()
    table = Table("minute", "tenant", "key", "served by", "requests", "errors", "prompt tokens", "completion tokens")
    for r in rows:
        table.add_row(
            f"{r.minute:%Y-%m-%d %H:%M}",
            r.tenant,
            r.key_id or "(open)",
            r.served_by,
            str(r.requests),
            str(r.errors),
            str(r.prompt_tokens),
            str(r.completion_tokens),
        )
    console.print(table)
