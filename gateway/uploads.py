"""Multipart uploads with a size limit: refused from the declared length before parsing, enforced while copying;
and a bound on how many are handled at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from core.errors import LengthRequired, PayloadTooLarge, Unavailable

# Multipart boundaries and the small form fields on top of the file itself.
FORM_OVERHEAD = 64 * 1024


def form_schema(**fields: dict[str, Any]) -> dict[str, Any]:
    """The ``openapi_extra`` that documents a multipart body whose fields (name: JSON schema) are all required."""
    schema = {"type": "object", "required": list(fields), "properties": fields}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def check_length(request: Request, limit: int, what: str) -> None:
    """Refuse an upload of ``what`` that does not declare its length, or declares more than ``limit``."""
    # Refuse before the multipart body is read: parsing it spools every byte to disk.
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise LengthRequired(f"{what} need a Content-Length header")
    if int(declared) > limit + FORM_OVERHEAD:
        raise PayloadTooLarge(f"upload is larger than the {limit}-byte limit", param="file")


def spool(upload: UploadFile, target: Path, limit: int) -> Path:
    """Copy the upload to ``target``, enforcing the size limit while copying (the declared length may lie)."""
    copied = 0
    with target.open("wb") as out:
        while chunk := upload.file.read(1 << 20):
            copied += len(chunk)
            if copied > limit:
                raise PayloadTooLarge(f"upload is larger than the {limit}-byte limit", param="file")
            out.write(chunk)
    return target


class UploadSlots:
    """At most ``size`` uploads handled at once, adapter archives and training files together: each spools to disk,
    then is extracted and hashed, or read and checked line by line. One more is refused with 503 and Retry-After
    rather than queued, so that waiting uploads hold no connection and no disk."""

    def __init__(self, size: int, *, retry_after: float = 5.0) -> None:
        self.size = size
        self.retry_after = retry_after
        self.busy = 0

    @asynccontextmanager
    async def hold(self, what: str) -> AsyncIterator[None]:
        """One slot for the duration of the block; Unavailable (503 ``uploads_busy``) when none is free, naming
        ``what`` was refused ("adapter upload")."""
        if self.busy >= self.size:
            raise Unavailable(
                f"{self.size} uploads are being handled, the most at once; retry the {what} shortly",
                retry_after=self.retry_after,
                code="uploads_busy",
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
