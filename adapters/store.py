"""The file side of the registry: version directories ``<root>/<name>/<sha256>/`` that never change.

A version is written in ``<root>/.staging/``, flushed to disk, then renamed into place, so a reader
(vLLM loading ``lora_path``) sees a complete directory or none at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from core.checksums import file_sha256


def digest(directory: Path) -> str:
    """The content hash of a directory: sha256 over sorted (relative path, file sha256) pairs."""
    outer = hashlib.sha256()
    files = sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file())
    for relative, path in files:
        outer.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return outer.hexdigest()


class LocalStore:
    """Version directories on a local (or shared, mounted) file system under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._staging_root = self.root / ".staging"
        self._staging_root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory under ``<root>/.staging/``, removed on exit unless committed."""
        path = Path(tempfile.mkdtemp(dir=self._staging_root))
        try:
            yield path
        finally:
            delete_tree(path)

    def commit(self, staged: Path, name: str, sha256: str) -> Path:
        """Make ``staged`` the durable, read-only version directory ``<root>/<name>/<sha256>/``.

        An existing directory with the same content (a retried or concurrent push) is reused.
        """
        final = self.root / name / sha256
        seal(staged)
        for _ in range(3):  # a concurrent delete may remove <root>/<name> between mkdir and rename
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                fsync(self.root)
            try:
                os.rename(staged, final)
            except FileNotFoundError:
                continue
            except OSError:
                if not final.is_dir():
                    raise
                if digest(final) == sha256:
                    return final  # an earlier or concurrent push of the same content
                # A damaged leftover whose content does not match its name: replace it.
                self.remove(final, keep_parent=True)
                continue
            fsync(final.parent)
            return final
        raise OSError(f"could not move {staged} to {final}")

    def remove(self, path: Path, *, keep_parent: bool = False) -> None:
        """Delete a version directory, and its adapter's directory once that is empty."""
        delete_tree(path)
        if not keep_parent:
            try:
                path.parent.rmdir()
            except OSError:
                pass  # other versions remain, or a concurrent push just made one

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Delete staging directories left by crashed pushes; returns how many.

        Only those older than ``older_than_s``: another process may be pushing into the same store.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._staging_root.iterdir():
            try:
                stale = path.stat().st_mtime <= cutoff
            except FileNotFoundError:
                continue  # its push just finished
            if stale:
                delete_tree(path)
                removed += 1
        return removed


def seal(root: Path) -> None:
    """Make a finished tree read-only and flush it to disk, children before parents.

    Each directory is flushed after what it lists. Read-only for everyone: vLLM may run as another
    user, and nobody may change what it serves.
    """
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        path.chmod(0o444 if path.is_file() else 0o555)
        fsync(path)


def delete_tree(path: Path) -> None:
    """``rmtree`` that also deletes trees ``seal`` made read-only; a missing tree is fine."""
    with suppress(FileNotFoundError):
        for directory in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
            directory.chmod(0o755)  # entries of a read-only directory cannot be unlinked
    shutil.rmtree(path, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file or directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
