"""The registry's rows read into its domain types, inside the caller's transaction.

The registry (versions, aliases) and the deployment store (merges, deployments) both read through these,
so a check and the write that depends on it happen in one transaction and neither store imports the other.
``root`` is the adapter store's root: versions are stored relative to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Row, RowMapping, func, select

from adapters import db
from adapters.catalog import Adapter, AdapterRouting, AdapterVersion, Deployment, Merge
from core.errors import NotFound


def adapters(conn: Connection, root: Path, names: Iterable[str] | None = None) -> list[Adapter]:
    """Adapters (all, or those in ``names``) by name, with their versions, aliases, reports and routing."""
    a, v, al = db.adapters, db.versions, db.aliases
    adapter_q = select(a).order_by(a.c.name)
    version_q = select(v).order_by(v.c.adapter_name, v.c.number)
    alias_q = select(al)
    if names is not None:
        wanted = list(names)
        adapter_q = adapter_q.where(a.c.name.in_(wanted))
        version_q = version_q.where(v.c.adapter_name.in_(wanted))
        alias_q = alias_q.where(al.c.adapter_name.in_(wanted))
    ev = db.evaluations
    # Only each version's newest report: older ones stay in the table as history.
    newest = select(func.max(ev.c.id)).group_by(ev.c.adapter_name, ev.c.version_number)
    if names is not None:
        newest = newest.where(ev.c.adapter_name.in_(wanted))
    evaluation_q = select(ev.c.adapter_name, ev.c.version_number, ev.c.report).where(ev.c.id.in_(newest))
    evaluations = {(r.adapter_name, r.version_number): r.report for r in conn.execute(evaluation_q)}
    versions: dict[str, list[AdapterVersion]] = {}
    for row in conn.execute(version_q).mappings():
        evaluation = evaluations.get((row["adapter_name"], row["number"]))
        versions.setdefault(row["adapter_name"], []).append(version_of(row, root, evaluation))
    aliases: dict[str, dict[str, int]] = {}
    for row in conn.execute(alias_q).mappings():
        aliases.setdefault(row["adapter_name"], {})[row["alias"]] = row["version_number"]
    routing_q = select(db.routing)
    if names is not None:
        routing_q = routing_q.where(db.routing.c.adapter_name.in_(wanted))
    routing = {r.adapter_name: _routing(r) for r in conn.execute(routing_q)}
    return [
        Adapter(
            name=row["name"],
            versions=tuple(versions.get(row["name"], ())),
            aliases=MappingProxyType(dict(sorted(aliases.get(row["name"], {}).items()))),
            created_at=db.utc(row["created_at"]),
            routing=routing.get(row["name"], AdapterRouting()),
            tenant=row["tenant"],
        )
        for row in conn.execute(adapter_q).mappings()
    ]


def adapter(conn: Connection, root: Path, name: str) -> Adapter:
    """The adapter ``name``; NotFound if there is none."""
    found = adapters(conn, root, names=[name])
    if not found:
        raise NotFound(f"adapter '{name}' does not exist", param="name")
    return found[0]


def version(conn: Connection, root: Path, name: str, number: int) -> AdapterVersion:
    """Version ``number`` of ``name``; NotFound, saying which versions exist, if there is none."""
    found = adapter(conn, root, name)
    for v in found.versions:
        if v.number == number:
            return v
    have = ", ".join(f"v{v.number}" for v in found.versions)
    raise NotFound(f"adapter '{name}' has no version v{number}; it has {have}", param="number")


def version_by_sha(conn: Connection, root: Path, name: str, sha256: str) -> AdapterVersion | None:
    """The version of ``name`` with this content, if there is one."""
    v = db.versions
    row = conn.execute(select(v).where((v.c.adapter_name == name) & (v.c.sha256 == sha256))).mappings().first()
    return version_of(row, root) if row is not None else None


def version_of(row: RowMapping, root: Path, evaluation: dict[str, Any] | None = None) -> AdapterVersion:
    """A row of the versions table (with its newest eval report) as an ``AdapterVersion``."""
    return AdapterVersion(
        name=row["adapter_name"],
        number=row["number"],
        sha256=row["sha256"],
        path=root / row["path"],
        rank=row["rank"],
        target_modules=tuple(row["target_modules"]),
        size_bytes=row["size_bytes"],
        created_at=db.utc(row["created_at"]),
        manifest=row["manifest"],
        evaluation=evaluation,
    )


def merges(conn: Connection, name: str, number: int) -> list[Merge]:
    """Every merge recorded for version ``number`` of ``name``, oldest first."""
    m = db.merges
    rows = conn.execute(
        select(m).where((m.c.adapter_name == name) & (m.c.version_number == number)).order_by(m.c.id)
    ).mappings()
    return [
        Merge(
            name=row["adapter_name"],
            number=row["version_number"],
            path=Path(row["path"]),
            report=MappingProxyType(row["report"]),
            created_at=db.utc(row["created_at"]),
        )
        for row in rows
    ]


def deployments(conn: Connection) -> list[Deployment]:
    """Every deployment, by name and version."""
    d = db.deployments
    return [_deployment(row) for row in conn.execute(select(d).order_by(d.c.adapter_name, d.c.version_number))]


def deployment(conn: Connection, name: str, number: int) -> Deployment | None:
    """The deployment of version ``number`` of ``name``, if it has one (at most one)."""
    d = db.deployments
    row = conn.execute(select(d).where((d.c.adapter_name == name) & (d.c.version_number == number))).first()
    return _deployment(row) if row is not None else None


def _deployment(row: Row[Any]) -> Deployment:
    return Deployment(
        name=row.adapter_name,
        number=row.version_number,
        url=row.url,
        served_model=row.served_model,
        pid=row.pid,
        created_at=db.utc(row.created_at),
    )


def _routing(row: Row[Any]) -> AdapterRouting:
    fallback = row.fallback
    return AdapterRouting(
        description=row.description,
        examples=tuple(row.examples or ()),
        fallback=tuple(fallback) if fallback is not None else None,
    )
