"""Directories Quiver builds once under its cache (the converted base model, the embedding export).

Each lives under a key that names its source and the revision of the code that built it, holds a checksum
file that is verified on every reuse, and appears whole or not at all: it is built in a temporary directory
beside its place and renamed into it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from core.checksums import file_sha256

CHECKSUMS = "quiver-checksums.json"


def cache_root() -> Path:
    """``QUIVER_CACHE_DIR``, default ``~/.cache/quiver``."""
    return Path(os.environ.get("QUIVER_CACHE_DIR", "~/.cache/quiver")).expanduser()


def verify(directory: Path) -> bool:
    """True when every file listed in the checksum file is present and unchanged."""
    manifest = directory / CHECKSUMS
    if not manifest.is_file():
        return False
    try:
        files: dict[str, str] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return bool(files) and all(
        (directory / name).is_file() and file_sha256(directory / name) == digest for name, digest in files.items()
    )


def reusable(target: Path, console: Console, redo: str) -> bool:
    """Whether ``target`` holds a build that passes its checksums; one that fails them is removed, saying it will
    ``redo`` it (e.g. "converting again")."""
    if not target.is_dir():
        return False
    with console.status(f"Verifying {target.name}"):
        if verify(target):
            return True
    console.print(f"[yellow]{target} failed its checksum; {redo}[/]")
    shutil.rmtree(target)
    return False


def write_checksums(directory: Path, source: str, revision: int) -> None:
    """List every file directly in ``directory`` with its sha256, for ``verify``."""
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    manifest = {"source": source, "revision": revision, "files": files}
    (directory / CHECKSUMS).write_text(json.dumps(manifest, indent=2))


@contextmanager
def building(target: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory to build ``target`` in; renamed to ``target`` when the block ends without an error.

    The caller writes the checksum file (``write_checksums``) before the block ends.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=prefix) as tmp:
        out = Path(tmp) / target.name
        out.mkdir()
        yield out
        _fsync_tree(out)
        # A concurrent builder may have won the race; its result is equally good.
        try:
            out.rename(target)
        except OSError:
            if not verify(target):
                raise


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
