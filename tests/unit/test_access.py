"""API keys, tenants, usage and the registry's migrations: in the stores over the registry's database (SQLite
and PostgreSQL) and through the gateway app (httpx MockTransport upstream)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI
from sqlalchemy import create_engine, text

from access.keys import ADAPTERS_WRITE, ADMIN, FINE_TUNE, INFERENCE
from access.store import KeyStore, UsageStore
from access.usage import UsageRow
from adapters import Registry, db
from adapters.db import Database
from core.errors import InvalidRequest, NotFound, PermissionDenied
from gateway import create_app
from tests.postgres import postgres_cluster  # noqa: F401 - a fixture, used by name
from tests.unit.test_gateway_app import RestartingVllm, _settings, keys_of, registry_of

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_cluster").create_database()
    return url


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(database_url, tmp_path / "store") as reg:
        yield reg


@pytest.fixture
def keys(registry: Registry) -> KeyStore:
    return KeyStore(registry.database)


@pytest.fixture
def usage(registry: Registry) -> UsageStore:
    return UsageStore(registry.database)


# -- migrations ------------------------------------------------------------------------------------


def _schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), db.metadata))
    finally:
        engine.dispose()


def test_a_new_database_is_at_the_newest_revision_and_matches_the_tables(database_url: str) -> None:
    engine = db.open_engine(database_url)
    assert db.schema_revision(engine) == "0002"
    engine.dispose()
    assert _schema_differences(database_url) == []


def test_a_database_from_before_migrations_is_upgraded_keeping_its_adapters(
    database_url: str, tmp_path: Path, tiny_adapter: Path
) -> None:
    engine = create_engine(database_url)
    db.metadata.create_all(engine, tables=[db.metadata.tables[t] for t in db.BASELINE_TABLES])
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE adapters DROP COLUMN tenant"))
        conn.execute(text("INSERT INTO revision (id, value) VALUES (1, 0)"))
    engine.dispose()
    # An adapter pushed by code from before migrations: rows written without the tenant column.
    with Registry.open(database_url, tmp_path / "store") as reg:
        reg.push_dir("old", tiny_adapter)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE api_keys"))
        conn.execute(text("DROP TABLE tenants"))
        conn.execute(text("DROP TABLE usage"))
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("ALTER TABLE adapters DROP COLUMN tenant"))
    engine.dispose()

    with Registry.open(database_url, tmp_path / "store") as reg:
        assert reg.adapter("old").tenant is None  # kept, and shared
        assert KeyStore(reg.database).create_key("acme", [INFERENCE]).key.tenant == "acme"
    assert _schema_differences(database_url) == []


def test_gateways_starting_together_migrate_once(database_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            db.open_engine(database_url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _schema_differences(database_url) == []


# -- keys and tenants ------------------------------------------------------------------------------


def test_a_key_is_shown_once_stored_hashed_and_verified(keys: KeyStore) -> None:
    created = keys.create_key("acme", [ADAPTERS_WRITE, INFERENCE], name="ci", requests_per_min=10)
    assert created.token.startswith(f"qk_{created.key.id}_")
    assert created.key.scopes == (INFERENCE, ADAPTERS_WRITE)  # canonical order
    ring = keys.key_ring()
    assert ring.verify(created.token) == created.key
    assert created.token.split("_", 2)[2] not in str(keys.api_keys())  # only its hash is kept
    assert ring.verify(created.token[:-1] + ("A" if created.token[-1] != "A" else "B")) is None
    assert ring.verify("sk-not-ours") is None
    assert ring.tenants["acme"].requests_per_min is None


def test_revoked_and_expired_keys_are_no_longer_active(keys: KeyStore) -> None:
    revoked = keys.create_key("acme", [INFERENCE]).key
    keys.revoke_key(revoked.id)
    soon = keys.create_key("acme", [INFERENCE], expires_at=datetime.now(UTC) + timedelta(seconds=30)).key
    now = datetime.now(UTC)
    states = {k.id: k.state(now) for k in keys.api_keys("acme")}
    assert states == {revoked.id: "revoked", soon.id: "active"}
    assert keys.key_ring().keys[soon.id].state(now + timedelta(minutes=1)) == "expired"
    with pytest.raises(NotFound, match="no API key"):
        keys.revoke_key("0123456789ab")


@pytest.mark.parametrize(
    ("tenant", "scopes", "message"),
    [
        ("Acme Corp", [INFERENCE], "invalid tenant"),
        ("acme", ["superuser"], "unknown scope 'superuser'"),
        ("acme", [], "at least one scope"),
    ],
)
def test_bad_keys_are_refused_with_the_reason(keys: KeyStore, tenant: str, scopes: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        keys.create_key(tenant, scopes)
    assert keys.api_keys() == []


def test_tenant_limits_change_and_unknown_tenants_are_not_found(keys: KeyStore) -> None:
    keys.create_key("acme", [INFERENCE])
    assert keys.set_tenant_limits("acme", tokens_per_min=5000).tokens_per_min == 5000
    assert keys.set_tenant_limits("acme", requests_per_min=60).tokens_per_min == 5000  # kept
    with pytest.raises(NotFound, match="tenant 'nobody'"):
        keys.set_tenant_limits("nobody", requests_per_min=1)


def test_pushes_keep_tenants_apart(registry: Registry, tiny_adapter: Path) -> None:
    assert registry.push_dir("bot", tiny_adapter, tenant="acme").version.number == 1
    registry.push_dir("shared-bot", tiny_adapter)
    # Another tenant cannot tell the name is taken, nor add to a shared adapter.
    with pytest.raises(NotFound, match="adapter 'bot' does not exist"):
        registry.push_dir("bot", tiny_adapter, tenant="globex")
    with pytest.raises(PermissionDenied, match="shared"):
        registry.push_dir("shared-bot", tiny_adapter, tenant="globex")
    catalog = registry.snapshot()
    assert sorted(catalog.visible_to("globex").adapters) == ["shared-bot"]
    assert sorted(catalog.visible_to("acme").adapters) == ["bot", "shared-bot"]
    assert sorted(catalog.visible_to(None).adapters) == ["bot", "shared-bot"]
    assert "bot@v1" not in catalog.visible_to("globex").model_ids()


def test_usage_adds_up_per_minute_and_filters(registry: Registry, usage: UsageStore) -> None:
    minute = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    usage.record_usage([UsageRow(minute, "acme", "k1", "bot@v1", 2, 0, 10, 5)])
    usage.record_usage(
        [UsageRow(minute, "acme", "k1", "bot@v1", 1, 1, 3, 0), UsageRow(minute, "globex", "k2", "base", 1, 0, 4, 4)]
    )
    rows = usage.usage(tenant="acme")
    assert rows == [UsageRow(minute, "acme", "k1", "bot@v1", 3, 1, 13, 5)]
    assert [r.tenant for r in usage.usage(served_by="bot")] == ["acme"]
    assert [r.tenant for r in usage.usage(key_id="k2")] == ["globex"]
    assert usage.usage(since=minute + timedelta(minutes=1)) == []
    assert registry.revision() == 0  # usage is not a registry change


# -- through the gateway -----------------------------------------------------------------------------


async def _client(app: FastAPI, client_host: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, client=(client_host, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_without_keys_the_gateway_is_open_on_loopback_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        # Start-up says so, and how to close it.
        assert any("open, to clients on loopback only" in r.getMessage() for r in caplog.records)
        assert (await client.post("/v1/chat/completions", json=CHAT | {"model": "m"})).status_code == 200
    async for client in _client(app, client_host="10.1.2.3"):
        refused = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"})
        assert refused.status_code == 401
        assert "only on loopback" in refused.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200  # probes and scrapes stay open


async def test_keys_scopes_and_tenants_through_the_api(tmp_path: Path, tiny_adapter: Path) -> None:
    app = create_app(_settings(tmp_path, usage_flush_s=3600), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app, client_host="10.1.2.3"):
        gateway = app.state.gateway
        view = gateway.registry
        with keys_of(app) as keys:
            acme_key = keys.create_key("acme", [INFERENCE, ADAPTERS_WRITE])
            acme = acme_key.token
            globex = keys.create_key("globex", [INFERENCE]).token
            admin = keys.create_key("ops", [ADMIN]).token
            gone = keys.create_key("acme", [INFERENCE])
            keys.revoke_key(gone.key.id)
            stale = keys.create_key("acme", [INFERENCE], expires_at=datetime.now(UTC) + timedelta(seconds=30))
        with registry_of(app) as reg:
            with reg.database.engine.begin() as conn:  # its expiry passes (no waiting for it)
                conn.execute(
                    db.api_keys.update()
                    .where(db.api_keys.c.id == stale.key.id)
                    .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
                )
            reg.push_dir("acme-bot", tiny_adapter, tenant="acme")
            reg.push_dir("shared-bot", tiny_adapter)
        await view.refresh()

        basic = {"authorization": f"Basic {acme}"}  # a key in the wrong scheme is no key
        for headers, code in (
            ({}, "invalid_api_key"),
            (_auth("qk_nope"), "invalid_api_key"),
            (basic, "invalid_api_key"),
        ):
            answer = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=headers)
            assert (answer.status_code, answer.json()["error"]["code"]) == (401, code)
        revoked = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth(gone.token))
        assert (revoked.status_code, revoked.json()["error"]["code"]) == (401, "revoked_api_key")
        expired = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth(stale.token))
        assert (expired.status_code, expired.json()["error"]["code"]) == (401, "expired_api_key")

        # Another tenant's adapter does not exist for globex: 404 everywhere, never 403.
        models = await client.get("/v1/models", headers=_auth(globex))
        ids = {m["id"] for m in models.json()["data"]}
        assert "shared-bot" in ids and not any(i.startswith("acme-bot") for i in ids)
        chat = await client.post("/v1/chat/completions", json=CHAT | {"model": "acme-bot"}, headers=_auth(globex))
        assert (chat.status_code, chat.json()["error"]["code"]) == (404, "model_not_found")
        assert (await client.get("/v1/adapters/acme-bot", headers=_auth(globex))).status_code == 404
        assert (await client.get("/v1/models/acme-bot@v1", headers=_auth(globex))).status_code == 404
        listed = await client.get("/v1/adapters", headers=_auth(globex))
        assert [a["name"] for a in listed.json()["data"]] == ["shared-bot"]

        # acme uses its own and the shared one; it may not change the shared one; globex may not write at all.
        for model in ("acme-bot", "shared-bot@v1"):
            served = await client.post("/v1/chat/completions", json=CHAT | {"model": model}, headers=_auth(acme))
            assert served.status_code == 200, served.text
        alias = {"version": 1, "force": True}
        moved = await client.put("/v1/adapters/acme-bot/aliases/prod", json=alias, headers=_auth(acme))
        assert moved.status_code == 200 and moved.json()["tenant"] == "acme"
        shared = await client.put("/v1/adapters/shared-bot/aliases/prod", json=alias, headers=_auth(acme))
        assert (shared.status_code, shared.json()["error"]["code"]) == (403, "permission_denied")
        other = await client.put("/v1/adapters/acme-bot/aliases/prod", json=alias, headers=_auth(globex))
        assert other.status_code == 403  # globex has no adapters:write at all
        jobs = await client.get("/v1/fine_tuning/jobs", headers=_auth(acme))
        assert jobs.status_code == 403 and FINE_TUNE in jobs.json()["error"]["message"]

        # An admin key sees every tenant's adapters.
        everything = await client.get("/v1/adapters", headers=_auth(admin))
        assert sorted(a["name"] for a in everything.json()["data"]) == ["acme-bot", "shared-bot"]

        # Usage: recorded per key and target; a tenant sees only its own.
        mine = (await client.get("/v1/usage", headers=_auth(acme))).json()["data"]
        assert {(r["tenant"], r["served_by"], r["requests"]) for r in mine} == {
            ("acme", "acme-bot@v1", 1),
            ("acme", "shared-bot@v1", 1),
        }
        assert sum(r["prompt_tokens"] for r in mine) == 4  # 2 per answer, from the upstream's usage
        assert (await client.get("/v1/usage?tenant=acme", headers=_auth(globex))).status_code == 404
        assert {r["tenant"] for r in (await client.get("/v1/usage", headers=_auth(admin))).json()["data"]} == {
            "acme",
            "globex",
        }

        # A key revoked outside this gateway (the CLI, another gateway) is refused from the next refresh on.
        with keys_of(app) as keys:
            keys.revoke_key(acme_key.key.id)
        await view.refresh()
        after = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth(acme))
        assert after.status_code == 401


async def test_the_admin_key_from_settings_and_the_openai_client(tmp_path: Path) -> None:
    settings = _settings(tmp_path, admin_key="a-long-bootstrap-secret")
    app = create_app(settings, transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app, client_host="10.1.2.3"):
        ok = await client.post(
            "/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth("a-long-bootstrap-secret")
        )
        assert ok.status_code == 200
        sdk = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="wrong", http_client=client, max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_a_short_admin_key_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        _settings(tmp_path, admin_key="short")


async def test_routing_rules_match_the_callers_tenant_and_key(tmp_path: Path, tiny_adapter: Path) -> None:
    with Registry.open(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "adapters") as reg:
        acme = KeyStore(reg.database).create_key("acme", [INFERENCE])
        globex = KeyStore(reg.database).create_key("globex", [INFERENCE])
        reg.push_dir("acme-bot", tiny_adapter, tenant="acme")
    rules = tmp_path / "routing.toml"
    rules.write_text(
        '[[rules]]\nname = "acme-default"\nmatch = { tenant = "acme", model = "m" }\nmodel = "acme-bot"\n'
        f'[[rules]]\nname = "one-key"\nmatch = {{ key = "{globex.key.id}" }}\nmodel = "base"\n'
    )
    app = create_app(_settings(tmp_path, routing_file=rules), transport=httpx.MockTransport(RestartingVllm()))
    async for client in _client(app):
        answer = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth(acme.token))
        assert answer.headers["x-quiver-route"] == "rule:acme-default"
        assert answer.headers["x-quiver-served-by"] == "acme-bot@v1"
        answer = await client.post("/v1/chat/completions", json=CHAT | {"model": "m"}, headers=_auth(globex.token))
        assert answer.headers["x-quiver-route"] == "rule:one-key"


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quiver.cli import app

    env = {"QUIVER_DATA_DIR": str(tmp_path), "QUIVER_REGISTRY_URL": None}

    def quiver(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args), env=env)
        return result.exit_code, result.output

    code, out = quiver("keys", "create", "--tenant", "acme", "--scope", "inference", "--rpm", "60", "--name", "ci")
    assert code == 0, out
    token = next(line for line in out.splitlines() if line.startswith("qk_"))
    code, listing = quiver("keys", "list")
    assert code == 0 and "acme" in listing and "active" in listing and " 60 " in listing
    assert token not in listing and token.rsplit("_", 1)[-1] not in listing  # the secret is never shown again
    database = Database.open(f"sqlite:///{tmp_path / 'registry.db'}")
    key = KeyStore(database).api_keys("acme")[0]
    assert KeyStore(database).key_ring().verify(token) is not None
    code, out = quiver("keys", "revoke", key.id)
    assert code == 0 and f"revoked {key.id}" in out
    assert quiver("keys", "list")[1].count("revoked") == 1
    code, out = quiver("keys", "create", "--tenant", "acme", "--scope", "superuser")
    assert code == 1 and "unknown scope 'superuser'" in out
    code, out = quiver("keys", "revoke", "0123456789ab")
    assert code == 1 and "no API key" in out
    database.close()


def test_head_names_the_newest_migration_script() -> None:
    # A database at db.HEAD opens without Alembic: a new migration script must move HEAD with it.
    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(config).get_heads() == [db.HEAD]


def test_opening_a_database_at_head_loads_no_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    db.open_engine(url).dispose()
    probe = (
        "import sys; from adapters import db; db.open_engine(sys.argv[1]).dispose(); print('alembic' in sys.modules)"
    )
    opened = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True, check=True)
    assert opened.stdout.strip() == "False"
