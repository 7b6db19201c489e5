"""Files for fine-tuning (``/v1/files``): training data checked on upload, and the results jobs write.

An upload is spooled into the store's staging area, loaded with ``trainingdata.formats.load_examples`` (so a
bad file is refused naming its line and problem, and nothing is kept), then committed the way adapter
versions are (read-only, fsync, rename into ``<root>/<file id>/<sha256>/<filename>``), and only then
recorded in SQL: a file is visible only once it is complete.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine, RowMapping, and_, delete, insert, or_, select

from adapters.store import LocalStore
from core.checksums import file_sha256
from core.errors import Conflict, InvalidRequest, NotFound
from jobs import db
from trainingdata.formats import DataError, DataFile, load_examples

FILES_DIR = "files"  # under the data dir
PURPOSE_FINE_TUNE = "fine-tune"
PURPOSE_RESULTS = "fine-tune-results"
MAX_FILENAME = 255


@dataclass(frozen=True)
class StoredFile:
    """One stored file; ``format`` and ``examples`` are what the loader found in training data."""

    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    path: Path
    format: str | None
    examples: int | None
    created_at: int


def relabel(exc: DataError, labels: Mapping[Path, str], *, param: str | None = None) -> DataError:
    """``exc`` with each stored path replaced by the name the client knows the file by.

    The loader names files by path, which here is an internal location (staging, or the store).
    """

    def swap(text: str) -> str:
        for path, label in labels.items():
            text = text.replace(str(path), label)
        return text

    renamed = DataError(swap(exc.message), problems=[swap(p) for p in exc.problems])
    renamed.param = param
    return renamed


def upload_name(filename: str | None) -> str:
    """The client's file name without any directory part; refused if nothing usable is left."""
    name = Path((filename or "").replace("\\", "/")).name
    if not name or name in (".", "..") or "\x00" in name or len(name.encode()) > MAX_FILENAME:
        raise InvalidRequest(
            "the uploaded file needs a name ending in .jsonl (e.g. train.jsonl), at most 255 bytes", param="file"
        )
    return name


class FileStore:
    """Uploaded training files and job result files: bytes in a ``LocalStore``, metadata in SQL."""

    def __init__(self, engine: Engine, root: Path) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{db.WRITE: True})
        self._store = LocalStore(root)
        self._store.sweep()

    @property
    def root(self) -> Path:
        """Where the files are stored."""
        return self._store.root

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory to spool an upload into; removed on exit unless its file was committed."""
        with self._store.staging() as staged:
            yield staged

    # -- adding ---------------------------------------------------------------------------------

    def add_training_file(self, staged: Path) -> StoredFile:
        """Check ``staged`` (named as the client named it) as training data, then store and record it.

        A ``DataError`` names the file as uploaded, the 1-based line and what is wrong, for every bad record.
        """
        try:
            data = load_examples(staged)
        except DataError as exc:
            raise relabel(exc, {staged: staged.name}, param="file") from None
        return self._commit(staged, PURPOSE_FINE_TUNE, data)

    def add_result_file(self, filename: str, content: bytes) -> StoredFile:
        """Store what a job produced (its metrics CSV) as a ``fine-tune-results`` file."""
        with self.staging() as directory:
            staged = directory / filename
            staged.write_bytes(content)
            return self._commit(staged, PURPOSE_RESULTS, None)

    def _commit(self, staged: Path, purpose: str, data: DataFile | None) -> StoredFile:
        file_id = f"file-{secrets.token_hex(12)}"
        sha256 = file_sha256(staged)
        size = staged.stat().st_size
        # The staging directory holds just this file, so committing it makes <root>/<id>/<sha256>/<name>.
        final = self._store.commit(staged.parent, file_id, sha256) / staged.name
        try:
            with self._writer.begin() as conn:
                conn.execute(
                    insert(db.files).values(
                        id=file_id,
                        filename=staged.name,
                        purpose=purpose,
                        bytes=size,
                        sha256=sha256,
                        path=final.relative_to(self.root).as_posix(),
                        format=data.format.value if data is not None else None,
                        examples=len(data) if data is not None else None,
                        created_at=int(time.time()),
                    )
                )
        except BaseException:
            self._store.remove(final.parent)
            raise
        return self.get(file_id)

    # -- reading --------------------------------------------------------------------------------

    def get(self, file_id: str, *, param: str = "file_id") -> StoredFile:
        """The file ``file_id``; NotFound naming ``param`` otherwise."""
        with self._engine.begin() as conn:
            row = conn.execute(select(db.files).where(db.files.c.id == file_id)).mappings().first()
        if row is None:
            raise NotFound(f"No such file: {file_id}", param=param, code="file_not_found")
        return self._file(row)

    def list_files(
        self,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: Literal["asc", "desc"] = "desc",
    ) -> db.Page[StoredFile]:
        """Files, newest first unless ``order="asc"``, after the file ``after`` (a cursor)."""
        where = db.files.c.purpose == purpose if purpose is not None else None
        with self._engine.begin() as conn:
            rows, more = db.page(conn, db.files, where, after=after, limit=limit, descending=order == "desc")
        return db.Page(tuple(self._file(r) for r in rows), more)

    def load(self, file: StoredFile) -> DataFile:
        """The file's examples; a ``DataError`` names the file by its id, not where it is stored."""
        try:
            return load_examples(file.path)
        except DataError as exc:
            raise relabel(exc, {file.path: file.id}) from None

    # -- deleting -------------------------------------------------------------------------------

    def delete(self, file_id: str) -> None:
        """Delete a file; refused (409) while a job that has not finished uses it."""
        f, j = db.files, db.jobs
        with self._writer.begin() as conn:
            row = conn.execute(select(f).where(f.c.id == file_id)).mappings().first()
            if row is None:
                raise NotFound(f"No such file: {file_id}", param="file_id", code="file_not_found")
            users = conn.scalars(
                select(j.c.id)
                .where(
                    and_(
                        or_(j.c.training_file == file_id, j.c.validation_file == file_id),
                        j.c.status.in_(db.ACTIVE_STATUSES),
                    )
                )
                .order_by(j.c.seq)
            ).all()
            if users:
                raise Conflict(
                    f"file {file_id} is used by fine-tuning job(s) {', '.join(users)} that have not finished; "
                    "cancel them or wait for them to finish first",
                    code="file_in_use",
                )
            conn.execute(delete(f).where(f.c.id == file_id))
        # The bytes go only after the row: a listed file always has its bytes.
        self._store.remove(self._file(row).path.parent)

    def _file(self, row: RowMapping) -> StoredFile:
        return db.from_row(StoredFile, row, path=self.root / row["path"])
