"""Merged models and deployments: versions merged into the base (``quiver merge``) and served by a dedicated
server of their own (``quiver deploy``). A store over the registry's database, beside the ``Registry``.

``Registry.delete_version`` refuses a deployed version and takes its merges with it; ``Registry.snapshot``
carries the deployments, which is how gateways learn where to send a deployed version's traffic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, insert

from adapters import db, queries
from adapters.catalog import AdapterVersion, Deployment, Merge, lora_name
from adapters.store import LocalStore
from core.errors import Conflict, NotFound

if TYPE_CHECKING:
    from adapters.registry import Registry


class DeploymentStore:
    """Merges and deployments of adapter versions. Synchronous; the gateway calls it from a thread."""

    def __init__(self, database: db.Database, store: LocalStore) -> None:
        self._db = database
        self._root = store.root

    @classmethod
    def beside(cls, registry: Registry) -> DeploymentStore:
        """The store over ``registry``'s database, its versions in ``registry``'s adapter store."""
        return cls(registry.database, registry.store)

    def record_merge(self, name: str, number: int, path: Path, report: dict[str, Any]) -> Merge:
        """Store a merged model of version ``number`` (its directory and equivalence report)."""

        def work(conn: Connection) -> Merge:
            queries.version(conn, self._root, name, number)
            conn.execute(
                insert(db.merges).values(
                    adapter_name=name,
                    version_number=number,
                    path=str(path.resolve()),
                    report=report,
                    created_at=datetime.now(UTC),
                )
            )
            return queries.merges(conn, name, number)[-1]

        return self._db.write(work)

    def merges(self, name: str, number: int) -> list[Merge]:
        """Every merge recorded for version ``number``, oldest first; NotFound for an unknown version."""
        with self._db.read() as conn:
            queries.version(conn, self._root, name, number)
            return queries.merges(conn, name, number)

    def latest_merge(self, name: str, number: int) -> Merge | None:
        """The newest merge of version ``number``, or None when it was never merged."""
        merges = self.merges(name, number)
        return merges[-1] if merges else None

    def add_deployment(self, name: str, number: int, url: str, served_model: str, pid: int | None = None) -> Deployment:
        """Register a dedicated server at ``url`` serving version ``number`` as ``served_model``.

        Conflict when the version already has one: a version is deployed at most once.
        """

        def work(conn: Connection) -> Deployment:
            self._check_deployable(conn, name, number)
            conn.execute(
                insert(db.deployments).values(
                    adapter_name=name,
                    version_number=number,
                    url=url.rstrip("/"),
                    served_model=served_model,
                    pid=pid,
                    created_at=datetime.now(UTC),
                )
            )
            created = queries.deployment(conn, name, number)
            assert created is not None  # just inserted, same transaction
            return created

        return self._db.write(work)

    def check_deployable(self, name: str, number: int) -> AdapterVersion:
        """What ``add_deployment`` would refuse (NotFound, Conflict), checked before a server is started for it."""
        with self._db.read() as conn:
            return self._check_deployable(conn, name, number)

    def remove_deployment(self, name: str, number: int) -> Deployment:
        """Unregister version ``number``'s deployment, so its traffic returns to the adapter; NotFound if none."""

        def work(conn: Connection) -> Deployment:
            existing = queries.deployment(conn, name, number)
            if existing is None:
                raise NotFound(f"{lora_name(name, number)} is not deployed", param="model")
            d = db.deployments
            conn.execute(delete(d).where((d.c.adapter_name == name) & (d.c.version_number == number)))
            return existing

        return self._db.write(work)

    def deployments(self) -> list[Deployment]:
        """Every deployment, by name and version."""
        with self._db.read() as conn:
            return queries.deployments(conn)

    def _check_deployable(self, conn: Connection, name: str, number: int) -> AdapterVersion:
        version = queries.version(conn, self._root, name, number)
        existing = queries.deployment(conn, name, number)
        if existing is not None:
            raise Conflict(
                f"{version.lora_name} is already deployed at {existing.url}; "
                f"remove that deployment first (quiver deploy rm {version.lora_name})"
            )
        return version
