"""The adapter registry: names, immutable numbered versions, aliases; metadata in SQL, files in a store.

A push stages the files, validates them, commits them to the store, and only then writes the version
row, so a version is visible only once its directory is complete. A failed push leaves nothing.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from adapters import db, queries
from adapters.archive import UploadLimits, extract_archive
from adapters.catalog import MERGE_FILE, VERSION_REF, Adapter, AdapterVersion, Catalog
from adapters.promotion import DEFAULT_MARGIN, PROMOTED_ALIASES, promotion_refusal
from adapters.spec import BaseModelSpec
from adapters.store import LocalStore, delete_tree, digest
from adapters.validation import AdapterInfo, adapter_files, validate_adapter_dir
from core.errors import Conflict, InvalidRequest, NotFound, PermissionDenied

# ':' makes room for fine-tuned models named as OpenAI names them, ``ft:<base>:<suffix>:<job id>``;
# '@' stays out, since it separates a name from a version or alias.
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")
ALIAS_RULE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class Unset:
    """The type of ``UNSET``: an argument the caller left out (None is a value of its own)."""


UNSET = Unset()


@dataclass(frozen=True)
class PushResult:
    """The version a push produced, or the existing one with identical content (``created=False``)."""

    version: AdapterVersion
    created: bool


class Registry:
    """Versions, aliases, eval reports and routing of named LoRA adapters. Synchronous; the gateway calls it
    from a thread.

    The other stores over the same database (``adapters.deployments.DeploymentStore``, ``access.store``) are
    opened over ``database``; closing the registry closes it.
    """

    def __init__(
        self,
        database: db.Database,
        store: LocalStore,
        *,
        base: BaseModelSpec | None,
        max_lora_rank: int,
        limits: UploadLimits,
        reserved_names: frozenset[str],
        promotion_margin: float = DEFAULT_MARGIN,
    ) -> None:
        self.database = database
        self.store = store
        self._base = base
        self._max_lora_rank = max_lora_rank
        self._limits = limits
        self._reserved_names = reserved_names
        self.promotion_margin = promotion_margin

    @classmethod
    def open(
        cls,
        database_url: str,
        store_root: Path,
        *,
        base: BaseModelSpec | None = None,
        max_lora_rank: int = 16,
        limits: UploadLimits = UploadLimits(),  # noqa: B008 - frozen, so one shared default is safe
        reserved_names: frozenset[str] = frozenset(),
        promotion_margin: float = DEFAULT_MARGIN,
    ) -> Registry:
        """Open (creating if needed) the database at ``database_url`` and the store at ``store_root``."""
        store = LocalStore(store_root)
        store.sweep()
        return cls(
            db.Database.open(database_url),
            store,
            base=base,
            max_lora_rank=max_lora_rank,
            limits=limits,
            reserved_names=reserved_names,
            promotion_margin=promotion_margin,
        )

    def close(self) -> None:
        """Release database connections."""
        self.database.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- pushing --------------------------------------------------------------------------------

    def push_dir(self, name: str, directory: Path, *, tenant: str | None = None) -> PushResult:
        """Push the adapter in ``directory`` (a PEFT ``save_pretrained`` output) as a version of ``name``.

        ``tenant``: a new adapter belongs to it, and an existing one must already (NotFound otherwise, so
        other tenants' names do not show); None pushes with no tenant check, and a new adapter is shared.
        """
        self._check_name(name)
        if not directory.is_dir():
            raise InvalidRequest(f"{directory} is not a directory", param="directory")
        with self.store.staging() as staged:
            for path in adapter_files(directory):
                shutil.copyfile(path, staged / path.name)
            return self._push_staged(name, staged, tenant)

    def push_archive(self, name: str, archive_path: Path, *, tenant: str | None = None) -> PushResult:
        """Push an adapter uploaded as a ``.tar``, ``.tar.gz`` or ``.zip`` archive (``tenant`` as in ``push_dir``)."""
        self._check_name(name)
        with self.store.staging() as staged:
            extract_archive(archive_path, staged, self._limits)
            return self._push_staged(name, staged, tenant)

    def _push_staged(self, name: str, staged: Path, tenant: str | None) -> PushResult:
        info = validate_adapter_dir(staged, self._base, self._max_lora_rank)
        sha256 = digest(staged)
        with self.database.read() as conn:
            self._check_tenant(conn, name, tenant)
            existing = queries.version_by_sha(conn, self.store.root, name, sha256)
        if existing is not None:
            return PushResult(existing, created=False)
        final = self.store.commit(staged, name, sha256)
        try:
            return self.database.write(lambda conn: self._insert_version(conn, name, sha256, final, info, tenant))
        except BaseException:
            # Take the files back unless a row uses them (a concurrent push of the same content may).
            # If even that check fails, keep them: an identical push later reuses them.
            with suppress(Exception):
                with self.database.read() as conn:
                    referenced = queries.version_by_sha(conn, self.store.root, name, sha256) is not None
                if not referenced:
                    self.store.remove(final)
            raise

    def _insert_version(
        self, conn: Connection, name: str, sha256: str, final: Path, info: AdapterInfo, tenant: str | None
    ) -> PushResult:
        self._check_tenant(conn, name, tenant)  # again: the name may have been taken since the first check
        existing = queries.version_by_sha(conn, self.store.root, name, sha256)
        if existing is not None:  # a concurrent push of the same content won
            return PushResult(existing, created=False)
        now = datetime.now(UTC)
        last = conn.scalar(select(db.adapters.c.last_number).where(db.adapters.c.name == name))
        number = (last or 0) + 1
        if last is None:
            conn.execute(insert(db.adapters).values(name=name, created_at=now, last_number=number, tenant=tenant))
        else:
            conn.execute(update(db.adapters).where(db.adapters.c.name == name).values(last_number=number))
        conn.execute(
            insert(db.versions).values(
                adapter_name=name,
                number=number,
                sha256=sha256,
                path=final.relative_to(self.store.root).as_posix(),
                rank=info.rank,
                target_modules=list(info.target_modules),
                size_bytes=info.size_bytes,
                created_at=now,
                manifest=dict(info.manifest) if info.manifest is not None else None,
            )
        )
        created = queries.version_by_sha(conn, self.store.root, name, sha256)
        assert created is not None  # just inserted, same transaction
        return PushResult(created, created=True)

    # -- reading --------------------------------------------------------------------------------

    def adapters(self) -> list[Adapter]:
        """Every adapter, by name."""
        with self.database.read() as conn:
            return queries.adapters(conn, self.store.root)

    def adapter(self, name: str) -> Adapter:
        """The adapter ``name``; NotFound if there is none."""
        with self.database.read() as conn:
            return queries.adapter(conn, self.store.root, name)

    def snapshot(self) -> Catalog:
        """An immutable, consistent view of every adapter, tagged with the revision it was read at."""
        with self.database.read() as conn:
            return Catalog(
                queries.adapters(conn, self.store.root),
                revision=self.database.revision(conn),
                deployments=queries.deployments(conn),
            )

    def resolve(self, model: str) -> AdapterVersion:
        """The version that ``name``, ``name@vN`` or ``name@alias`` means now; ModelNotFound otherwise.

        Each call reads the database; on a hot path keep a ``snapshot()`` while ``revision()`` stands.
        """
        with self.database.read() as conn:
            found = queries.adapters(conn, self.store.root, names=[Catalog.adapter_name(model)])
        return Catalog(found).resolve(model)

    def revision(self) -> int:
        """A counter bumped by every change: a cheap way to tell that a snapshot is stale."""
        with self.database.read() as conn:
            return self.database.revision(conn)

    # -- aliases and deletion -------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, number: int, *, force: bool = False) -> Adapter:
        """Point ``name@alias`` at version ``number`` (creating or moving the alias, e.g. a rollback).

        ``prod`` takes only a version whose eval report clears the promotion margin (Conflict, code
        ``promotion_refused``, saying why), unless ``force``.
        """
        if not ALIAS_RULE.fullmatch(alias) or VERSION_REF.fullmatch(alias):
            raise InvalidRequest(
                f"invalid alias {alias!r}: use 1-32 characters a-z, 0-9, '_', '-', starting with a letter "
                "(^[a-z][a-z0-9_-]{0,31}$), and not of the form v<digits>, which names a version",
                param="alias",
            )

        def work(conn: Connection) -> Adapter:
            version = queries.version(conn, self.store.root, name, number)
            if alias in PROMOTED_ALIASES and not force:
                reason = promotion_refusal(version, self.promotion_margin)
                if reason is not None:
                    raise Conflict(f"promotion to {name}@{alias} refused: {reason}", code="promotion_refused")
            key = (db.aliases.c.adapter_name == name) & (db.aliases.c.alias == alias)
            if conn.scalar(select(db.aliases.c.version_number).where(key)) is None:
                conn.execute(insert(db.aliases).values(adapter_name=name, alias=alias, version_number=number))
            else:
                conn.execute(update(db.aliases).where(key).values(version_number=number))
            return queries.adapter(conn, self.store.root, name)

        return self.database.write(work)

    def record_evaluation(self, name: str, number: int, report: dict[str, Any]) -> AdapterVersion:
        """Store an eval report with version ``number``; it becomes the one promotion reads."""

        def work(conn: Connection) -> AdapterVersion:
            queries.version(conn, self.store.root, name, number)
            conn.execute(
                insert(db.evaluations).values(
                    adapter_name=name, version_number=number, report=report, created_at=datetime.now(UTC)
                )
            )
            return queries.version(conn, self.store.root, name, number)

        return self.database.write(work)

    def set_routing(
        self,
        name: str,
        *,
        description: str | None | Unset = UNSET,
        examples: Sequence[str] | Unset = UNSET,
        fallback: Sequence[str] | None | Unset = UNSET,
    ) -> Adapter:
        """Change how the gateway routes to ``name``; arguments left out keep their value.

        ``fallback=None`` returns the adapter to the gateway's default chain; ``[]`` means no fallback.
        """
        for i, example in enumerate(() if isinstance(examples, Unset) else examples):
            if not isinstance(example, str) or not example.strip():
                raise InvalidRequest(f"examples[{i}] must be a non-empty string", param="examples")
        if not isinstance(fallback, Unset) and fallback is not None:
            for target in fallback:
                if not isinstance(target, str) or not target.strip() or target.partition("@")[0] == name:
                    raise InvalidRequest(
                        f"fallback target {target!r} must be a model string other than the adapter itself",
                        param="fallback",
                    )

        def work(conn: Connection) -> Adapter:
            current = queries.adapter(conn, self.store.root, name).routing
            row = {
                "description": current.description if isinstance(description, Unset) else description,
                "examples": list(current.examples if isinstance(examples, Unset) else examples),
                "fallback": (
                    (list(current.fallback) if current.fallback is not None else None)
                    if isinstance(fallback, Unset)
                    else (list(fallback) if fallback is not None else None)
                ),
            }
            if conn.execute(update(db.routing).where(db.routing.c.adapter_name == name).values(**row)).rowcount == 0:
                conn.execute(insert(db.routing).values(adapter_name=name, **row))
            return queries.adapter(conn, self.store.root, name)

        return self.database.write(work)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; NotFound if it does not exist."""

        def work(conn: Connection) -> None:
            key = (db.aliases.c.adapter_name == name) & (db.aliases.c.alias == alias)
            if conn.execute(delete(db.aliases).where(key)).rowcount == 0:
                queries.adapter(conn, self.store.root, name)  # NotFound for an unknown adapter first
                raise NotFound(f"adapter '{name}' has no alias '{alias}'", param="alias")

        self.database.write(work)

    def delete_version(self, name: str, number: int) -> None:
        """Delete version ``number``, its files and its merged models; Conflict while an alias or a deployment uses it.

        Deleting the last version deletes the adapter.
        """

        def work(conn: Connection) -> list[Path]:
            version = queries.version(conn, self.store.root, name, number)
            pointing = conn.scalars(
                select(db.aliases.c.alias)
                .where((db.aliases.c.adapter_name == name) & (db.aliases.c.version_number == number))
                .order_by(db.aliases.c.alias)
            ).all()
            if pointing:
                names = ", ".join(f"{name}@{a}" for a in pointing)
                raise Conflict(
                    f"{version.lora_name} is still pointed at by {names}; move or delete those aliases first"
                )
            deployment = queries.deployment(conn, name, number)
            if deployment is not None:
                raise Conflict(
                    f"{version.lora_name} is deployed at {deployment.url}; "
                    f"remove the deployment first (quiver deploy rm {version.lora_name})"
                )
            merged = [m.path for m in queries.merges(conn, name, number)]
            for table in (db.evaluations, db.merges):
                conn.execute(delete(table).where((table.c.adapter_name == name) & (table.c.version_number == number)))
            conn.execute(
                delete(db.versions).where((db.versions.c.adapter_name == name) & (db.versions.c.number == number))
            )
            remaining = conn.scalar(
                select(func.count()).select_from(db.versions).where(db.versions.c.adapter_name == name)
            )
            if not remaining:
                conn.execute(delete(db.adapters).where(db.adapters.c.name == name))
            return [version.path, *merged]

        path, *merged = self.database.write(work)
        # Files go only after the row is gone: a visible version always has its directory.
        self.store.remove(path)
        for directory in merged:
            # Only a directory Quiver's merge wrote: the path is whatever `--output` said.
            if (directory / MERGE_FILE).is_file():
                delete_tree(directory)

    # -- internals ------------------------------------------------------------------------------

    def _check_tenant(self, conn: Connection, name: str, tenant: str | None) -> None:
        if tenant is None:
            return
        owner = conn.execute(select(db.adapters.c.tenant).where(db.adapters.c.name == name)).first()
        if owner is not None and owner[0] != tenant:
            if owner[0] is None:
                raise PermissionDenied(f"adapter '{name}' is shared; only an admin key can push versions of it")
            raise NotFound(f"adapter '{name}' does not exist", param="name")

    def _check_name(self, name: str) -> None:
        if not NAME_RULE.fullmatch(name):
            raise InvalidRequest(
                f"invalid adapter name {name!r}: use 1-64 characters a-z, 0-9, '.', '_', ':', '-', "
                "starting with a letter or digit (^[a-z0-9][a-z0-9._:-]{0,63}$)",
                param="name",
            )
        if name in self._reserved_names:
            raise InvalidRequest(f"adapter name {name!r} is reserved", param="name")
