"""Safe extraction of uploaded adapter archives (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``).

Uploads are untrusted: every member is checked before it is written (no absolute paths, no ``..``,
no links or special files) and sizes are enforced both as declared and while copying, because a
crafted archive can declare one size and inflate to another. While a member is read, the bytes it
inflates to are weighed against the compressed bytes read for it, so a decompression bomb stops after
a few megabytes; and a ``.safetensors`` member's header is checked before its body is written.
"""

from __future__ import annotations

import io
import json
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
from typing import IO, TYPE_CHECKING

from core.errors import InvalidAdapter, InvalidArchive, PayloadTooLarge

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_GiB = 1024**3
_CHUNK = 1024 * 1024
# The first bytes of a member that the inflation ratio leaves alone: small text files compress well, and
# a reader's read-ahead blurs which member the compressed bytes it took belong to.
_INFLATION_ALLOWANCE = _CHUNK
# The safetensors format's own bound on its JSON header.
_MAX_SAFETENSORS_HEADER = 100_000_000

# What a damaged or hostile archive makes the standard library raise while we read it.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload: the archive, each member, everything extracted, and the member count."""

    max_archive_bytes: int = 2 * _GiB
    max_extracted_bytes: int = 4 * _GiB
    max_members: int = 64
    max_member_bytes: int = 4 * _GiB
    # Bytes a member may inflate to per compressed byte read for it. Trained weights compress about 1.1x, a
    # fresh LoRA's zero B matrices make it 2x, JSON and text 3-10x; zeros inflate about 1000x under deflate.
    max_inflation: float = 20.0


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
    with _MeteredFile(archive) as file:
        head = file.read(4)
        file.seek(0)
        budget = _Budget(limits, file)
        # Sniff the content, not the file name: the gateway stores uploads under names of its own.
        if head in (b"PK\x03\x04", b"PK\x05\x06"):
            _extract_zip(file, dest, budget)
        else:
            _extract_tar(file, dest, budget)
    _strip_single_top_dir(dest)


class _MeteredFile(io.FileIO):
    """The archive on disk, counting the bytes read from it: the compressed bytes consumed so far."""

    consumed = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:
        count = super().readinto(buffer)
        self.consumed += count or 0
        return count


class _Budget:
    """Counts members and bytes against the limits as extraction goes."""

    def __init__(self, limits: UploadLimits, archive: _MeteredFile) -> None:
        self.limits = limits
        self.archive = archive
        self.members = 0
        self.total = 0

    def admit(self, name: str, declared_size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(f"archive has more than {self.limits.max_members} members")
        self.check_sizes(name, declared_size, self.total + declared_size)

    def copy(self, name: str, src: IO[bytes], target: Path, size: int) -> None:
        """Write member ``name`` of declared ``size`` bytes from ``src`` to ``target``, within the limits."""
        member = _Member(self, name, src)
        with target.open("xb") as out:
            if target.suffix == ".safetensors":
                out.write(_safetensors_header(member, size))
            while chunk := member.read(_CHUNK):
                out.write(chunk)

    def check_sizes(self, name: str, member_bytes: int, total_bytes: int) -> None:
        """Raise when member ``name`` or the whole extraction is past its size limit."""
        if member_bytes > self.limits.max_member_bytes:
            raise PayloadTooLarge(f"archive member '{name}' is larger than {self.limits.max_member_bytes} bytes")
        if total_bytes > self.limits.max_extracted_bytes:
            raise PayloadTooLarge(
                f"archive extracts to more than {self.limits.max_extracted_bytes} bytes (at member '{name}')"
            )

    def check_inflation(self, name: str, member_bytes: int, consumed: int) -> None:
        """Raise when member ``name`` inflated to ``member_bytes`` from ``consumed`` compressed bytes is a bomb."""
        ratio = self.limits.max_inflation
        if member_bytes > ratio * consumed + _INFLATION_ALLOWANCE:
            raise InvalidArchive(
                f"archive member '{name}' inflates more than {ratio:g}x ({consumed} compressed bytes to "
                f"{member_bytes} so far): a decompression bomb, not adapter files"
            )


class _Member:
    """One member being read, checked against the limits as its bytes arrive."""

    def __init__(self, budget: _Budget, name: str, src: IO[bytes]) -> None:
        self.budget = budget
        self.name = name
        self.src = src
        self.read_bytes = 0
        self.started = budget.archive.consumed

    def read(self, size: int) -> bytes:
        with _reading(self.name):
            chunk = self.src.read(size)
        budget = self.budget
        self.read_bytes += len(chunk)
        budget.total += len(chunk)
        budget.check_sizes(self.name, self.read_bytes, budget.total)
        budget.check_inflation(self.name, self.read_bytes, budget.archive.consumed - self.started)
        return chunk

    def read_exactly(self, size: int) -> bytes:
        parts: list[bytes] = []
        left = size
        while left and (chunk := self.read(min(left, _CHUNK))):
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


def _safetensors_header(member: _Member, size: int) -> bytes:
    """The 8-byte length and JSON header of a safetensors member of ``size`` bytes, read and checked."""

    def unreadable(why: str) -> InvalidAdapter:
        return InvalidAdapter(f"archive member '{member.name}' is not a readable safetensors file: {why}")

    head = member.read_exactly(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise unreadable(f"its header length {length} does not fit the file's {size} bytes")
    text = member.read_exactly(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise unreadable("its header is not JSON") from None
    if not isinstance(header, dict):
        raise unreadable("its header is not a JSON object")
    end = 0
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise unreadable(f"tensor '{key}' has no data_offsets")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise unreadable(f"its tensors take {end} bytes, but {size - 8 - length} follow the header")
    return head + text


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


def _extract_tar(archive: _MeteredFile, dest: Path, budget: _Budget) -> None:
    with _reading(None):
        try:
            tar = tarfile.open(fileobj=archive, mode="r:*")
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
                budget.copy(name, src, _open_file_target(name, target), member.size)
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


def _extract_zip(archive: _MeteredFile, dest: Path, budget: _Budget) -> None:
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
                budget.copy(name, src, _open_file_target(name, target), info.file_size)


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
