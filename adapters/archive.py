"""Safe extraction of uploaded adapter archives (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``).

Uploads are untrusted: every member is checked before it is written (no absolute paths, no ``..``,
no links or special files) and sizes are enforced both as declared and while copying, because a
crafted archive can declare one size and inflate to another.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import InvalidArchive, PayloadTooLarge

_GiB = 1024**3
_CHUNK = 1024 * 1024

# What a damaged or hostile archive makes the standard library raise while we read it.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload: the archive, each member, everything extracted, and the member count."""

    max_archive_bytes: int = 2 * _GiB
    max_extracted_bytes: int = 4 * _GiB
    max_members: int = 64
    max_member_bytes: int = 4 * _GiB


def extract_archive(archive: Path, dest: Path, limits: UploadLimits) -> None:
    """Extract ``archive`` into the empty directory ``dest``, stripping a single top-level directory.

    Raises InvalidArchive for unsafe or unreadable archives and PayloadTooLarge past ``limits``;
    on error ``dest`` may hold a partial extraction that the caller throws away.
    """
    if any(dest.iterdir()):
        raise ValueError(f"extraction target {dest} is not empty")
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise PayloadTooLarge(f"archive is {size} bytes; the limit is {limits.max_archive_bytes} bytes")
    with archive.open("rb") as f:
        head = f.read(4)
    budget = _Budget(limits)
    # Sniff the content, not the file name: the gateway stores uploads under names of its own.
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        _extract_zip(archive, dest, budget)
    else:
        _extract_tar(archive, dest, budget)
    _strip_single_top_dir(dest)


class _Budget:
    """Counts members and bytes against the limits as extraction goes."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0

    def admit(self, name: str, declared_size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(f"archive has more than {self.limits.max_members} members")
        self._check(name, declared_size, self.total + declared_size)

    def copy(self, name: str, src: IO[bytes], target: Path) -> None:
        written = 0
        with _reading(name):
            chunk = src.read(_CHUNK)
        with target.open("xb") as out:
            while chunk:
                written += len(chunk)
                self.total += len(chunk)
                self._check(name, written, self.total)
                out.write(chunk)
                with _reading(name):
                    chunk = src.read(_CHUNK)

    def _check(self, name: str, member_bytes: int, total_bytes: int) -> None:
        if member_bytes > self.limits.max_member_bytes:
            raise PayloadTooLarge(f"archive member '{name}' is larger than {self.limits.max_member_bytes} bytes")
        if total_bytes > self.limits.max_extracted_bytes:
            raise PayloadTooLarge(
                f"archive extracts to more than {self.limits.max_extracted_bytes} bytes (at member '{name}')"
            )


@contextmanager
def _reading(name: str | None) -> Iterator[None]:
    """Turn the standard library's read errors into InvalidArchive naming the member."""
    try:
        yield
    except _READ_ERRORS as e:
        where = f" at member '{name}'" if name else ""
        raise InvalidArchive(f"archive is unreadable{where}: {e}") from e


def _target(dest: Path, name: str) -> Path:
    """Where member ``name`` goes under ``dest``; refuses names that could land anywhere else."""
    if not name or "\x00" in name or "\\" in name:
        raise InvalidArchive(f"archive member '{name}' has an invalid name")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise InvalidArchive(f"archive member '{name}' has an absolute path")
    if ".." in path.parts:
        raise InvalidArchive(f"archive member '{name}' has a '..' component")
    # "." and "./x" are what `tar -C dir -czf a.tgz .` writes: they name dest itself and dest/x.
    return dest.joinpath(*(p for p in path.parts if p != "."))


def _make_dir(name: str, target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise InvalidArchive(f"archive member '{name}' clashes with another member") from e


def _open_file_target(name: str, target: Path) -> Path:
    if target.exists():
        raise InvalidArchive(f"archive member '{name}' appears twice or clashes with another member")
    _make_dir(name, target.parent)
    return target


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with _reading(None):
        try:
            tar = tarfile.open(archive, mode="r:*")
        except tarfile.ReadError as e:  # no known format matched; a damaged gzip raises otherwise
            raise InvalidArchive("upload is not a .tar, .tar.gz/.tgz or .zip archive") from e
    with tar:
        while True:
            with _reading(None):
                member = tar.next()
            if member is None:
                break
            name = member.name
            target = _target(dest, name)
            if member.isdir():
                budget.admit(name, 0)
                _make_dir(name, target)
            elif member.isreg():
                budget.admit(name, member.size)
                src = tar.extractfile(member)
                assert src is not None  # a regular member always has data
                budget.copy(name, src, _open_file_target(name, target))
            else:
                raise InvalidArchive(f"archive member '{name}' is a {_tar_kind(member)}; only files are allowed")


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isfifo():
        return "fifo"
    if member.isdev():
        return "device"
    return "special file"


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with _reading(None):
        zf = zipfile.ZipFile(archive)
    with zf:
        for info in zf.infolist():
            name = info.filename
            target = _target(dest, name)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.flag_bits & 0x1:
                raise InvalidArchive(f"archive member '{name}' is encrypted")
            if kind == stat.S_IFLNK:
                raise InvalidArchive(f"archive member '{name}' is a symbolic link; only files are allowed")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise InvalidArchive(f"archive member '{name}' is a special file; only files are allowed")
            if info.is_dir():
                budget.admit(name, 0)
                _make_dir(name, target)
                continue
            budget.admit(name, info.file_size)
            with _reading(name):
                src = zf.open(info)
            with src:
                budget.copy(name, src, _open_file_target(name, target))


def _strip_single_top_dir(dest: Path) -> None:
    """``adapter/x, adapter/y`` extracts as ``x, y``: archives of a directory usually carry its name."""
    entries = list(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    # Move the directory aside first: a child may share its name.
    top = entries[0].rename(dest / f".strip-{uuid.uuid4().hex}")
    for child in top.iterdir():
        os.rename(child, dest / child.name)
    shutil.rmtree(top)
