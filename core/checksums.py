"""Content hashes of files."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1024 * 1024


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks so large weights do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
