"""The files API (``/v1/files``, OpenAI's shape): training data for fine-tuning, and the results jobs write.

An upload is checked with the training-data loader before anything is kept: a bad file is a 400 whose
message names each bad line and what is wrong with it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from access.keys import FINE_TUNE
from core.errors import InvalidRequest
from gateway.auth import requires
from gateway.deps import GatewayDep
from gateway.fine_tuning import FineTuningDep
from gateway.protocol import FileDeleted, FileList, FilePublic
from gateway.uploads import check_length, form_schema, spool
from jobs.files import PURPOSE_FINE_TUNE, FileStore, StoredFile, upload_name

router = APIRouter(prefix="/v1/files", dependencies=[Depends(requires(FINE_TUNE))])

_UPLOAD_SCHEMA = form_schema(
    purpose={"type": "string", "enum": [PURPOSE_FINE_TUNE]},
    file={"type": "string", "format": "binary", "description": "Training data, .jsonl"},
)


def file_public(file: StoredFile) -> FilePublic:
    """Wire form of a file."""
    return FilePublic(
        id=file.id, bytes=file.bytes, created_at=file.created_at, filename=file.filename, purpose=file.purpose
    )


def _store(files: FileStore, upload: UploadFile, name: str, limit: int) -> StoredFile:
    with files.staging() as directory:
        # Spooled under the client's own file name: the loader reads the format from its suffix.
        return files.add_training_file(spool(upload, directory / name, limit))


@router.post("", response_model=FilePublic, openapi_extra=_UPLOAD_SCHEMA)
async def upload_file(request: Request, gateway: GatewayDep, fine_tuning: FineTuningDep) -> FilePublic:
    """Upload training data (multipart ``purpose=fine-tune`` and ``file``); checked before it is stored. Counted
    with adapter uploads against ``max_concurrent_uploads``."""
    limit = gateway.settings.max_file_bytes
    check_length(request, limit, "file uploads")
    async with gateway.uploads.hold("training file upload"), request.form(max_files=1, max_fields=8) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != PURPOSE_FINE_TUNE:
            raise InvalidRequest(
                f"purpose must be '{PURPOSE_FINE_TUNE}', the only purpose files are stored for here; got {purpose!r}",
                param="purpose",
            )
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("form field 'file' (the training data, .jsonl) is required", param="file")
        name = upload_name(upload.filename)
        stored = await fine_tuning.call(_store, fine_tuning.jobs.files, upload, name, limit)
    return file_public(stored)


@router.get("", response_model=FileList)
async def list_files(
    fine_tuning: FineTuningDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """Files, newest first unless ``order=asc``; ``after`` is the last id of the previous page."""
    files = fine_tuning.jobs.files
    page = await fine_tuning.call(lambda: files.list_files(purpose=purpose, after=after, limit=limit, order=order))
    data = [file_public(f) for f in page.items]
    return FileList(
        data=data, has_more=page.has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{file_id}", response_model=FilePublic)
async def get_file(file_id: str, fine_tuning: FineTuningDep) -> FilePublic:
    """One file's metadata, or 404."""
    return file_public(await fine_tuning.call(fine_tuning.jobs.files.get, file_id))


@router.get("/{file_id}/content")
async def file_content(file_id: str, fine_tuning: FineTuningDep) -> FileResponse:
    """A file's bytes (training data as uploaded, or a job's ``step_metrics.csv``)."""
    file = await fine_tuning.call(fine_tuning.jobs.files.get, file_id)
    media = "text/csv" if file.filename.endswith(".csv") else "application/octet-stream"
    return FileResponse(file.path, media_type=media)


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, fine_tuning: FineTuningDep) -> FileDeleted:
    """Delete a file; 409 while a job that has not finished uses it."""
    await fine_tuning.call(fine_tuning.jobs.files.delete, file_id)
    return FileDeleted(id=file_id)
