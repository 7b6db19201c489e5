"""Fine-tuning jobs in the OpenAI shape, all of their state in SQL.

    validating_files -> queued -> running -> succeeded | failed | cancelled

The gateway creates a job (checking what it can at once: the files exist, have the purpose and the
format the method trains on) and then validates its data (``validate``: the same loading, hold-out
split and leakage checks training runs, without the model). Worker processes (``training.worker``)
claim queued jobs one at a time, report events, checkpoints and heartbeats, and finish them.

Every status move is a conditional update (``WHERE status IN ...``, and for a worker's moves
``AND worker = me``), so a cancel and a worker's last write cannot both win, and a worker presumed
dead cannot later overwrite what was decided about its job.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack, cast

from sqlalchemy import Connection, Engine, RowMapping, insert, select, update

from core.errors import Conflict, InvalidRequest, NotFound, QuiverError
from jobs import db
from jobs.files import FILES_DIR, PURPOSE_FINE_TUNE, FileStore, StoredFile, relabel
from trainingdata.formats import DataError, DataFormat
from trainingdata.splits import DEFAULT_MAX_OVERLAP, load_splits

Method = Literal["supervised", "dpo"]
Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
Level = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]

# The registry's names are at most 64 characters (its column is VARCHAR(64)); the suffix is kept short
# enough that ``ft:<base>:<suffix>:<job id>`` always fits with some of the base name left.
SUFFIX_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,17}")
MAX_MODEL_NAME = 64
# Event and checkpoint ids follow OpenAI's prefixes; job ids are short so that model names fit.
JOB_PREFIX = "ftjob-"


@dataclass(frozen=True)
class Hyperparameters:
    """The resolved hyperparameters of a job (``auto`` is resolved when the job is created)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None  # DPO only

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's hyperparameters object; ``beta`` only for DPO."""
        out: dict[str, Any] = {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        }
        if self.beta is not None:
            out["beta"] = self.beta
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hyperparameters:
        """The inverse of ``to_dict``."""
        beta = data.get("beta")
        return cls(
            n_epochs=int(data["n_epochs"]),
            batch_size=int(data["batch_size"]),
            learning_rate_multiplier=float(data["learning_rate_multiplier"]),
            beta=float(beta) if beta is not None else None,
        )


# What "auto" means: TrainConfig's own defaults (3 epochs, batch 8, the method's learning rate, beta 0.1).
AUTO_HYPERPARAMETERS: Mapping[str, int | float] = {
    "n_epochs": 3,
    "batch_size": 8,
    "learning_rate_multiplier": 1.0,
    "beta": 0.1,
}


def resolve_hyperparameters(method: Method, given: Mapping[str, int | float | str | None]) -> Hyperparameters:
    """The hyperparameters a job runs with: each given number, or for ``"auto"`` (or none) the default."""

    def value(name: str) -> float:
        chosen = given.get(name)
        return float(chosen if isinstance(chosen, int | float) else AUTO_HYPERPARAMETERS[name])

    return Hyperparameters(
        n_epochs=int(value("n_epochs")),
        batch_size=int(value("batch_size")),
        learning_rate_multiplier=value("learning_rate_multiplier"),
        beta=value("beta") if method == "dpo" else None,
    )


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as OpenAI reports it: a code, a message and the parameter at fault."""

    code: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, exc: QuiverError) -> JobError:
        """The error a QuiverError stands for."""
        return cls(code=exc.code, message=exc.message, param=exc.param)

    def to_dict(self) -> dict[str, str | None]:
        """The JSON stored and shown."""
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass(frozen=True)
class JobSpec:
    """What a client asked for; ``model`` is already the served base model's name."""

    model: str
    training_file: str
    method: Method = "supervised"
    hyperparameters: Hyperparameters = field(default_factory=lambda: resolve_hyperparameters("supervised", {}))
    validation_file: str | None = None
    suffix: str | None = None
    seed: int = 0
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Job:
    """A fine-tuning job as stored; ``output_model`` is the adapter name a success is pushed under."""

    id: str
    model: str
    training_file: str
    validation_file: str | None
    method: Method
    hyperparameters: Hyperparameters
    suffix: str | None
    seed: int
    output_model: str
    metadata: Mapping[str, str] | None
    status: Status
    created_at: int
    started_at: int | None
    finished_at: int | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: JobError | None
    result_files: tuple[str, ...]
    train_examples: int | None
    worker: str | None

    @property
    def training_method(self) -> str:
        """The method as ``training`` names it (``sft`` or ``dpo``)."""
        return "dpo" if self.method == "dpo" else "sft"


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's log; ``type="metrics"`` events carry step, losses and accuracy in ``data``."""

    id: str
    job_id: str
    created_at: int
    level: Level
    type: EventType
    message: str
    data: Mapping[str, Any] | None


@dataclass(frozen=True)
class JobCheckpoint:
    """A checkpoint saved during training, pushed as a version of the job's model and servable as one."""

    id: str
    job_id: str
    step_number: int
    created_at: int
    fine_tuned_model_checkpoint: str
    metrics: Mapping[str, float]


class EventKind(TypedDict, total=False):
    """How an event shows besides its message: ``level`` (default ``info``), ``type`` (``message``), ``data``."""

    level: Level
    type: EventType
    data: Mapping[str, Any] | None


@dataclass(frozen=True)
class JobFiles:
    """The stored files a job trains and validates on."""

    training: StoredFile
    validation: StoredFile | None

    @property
    def validation_path(self) -> Path | None:
        """Where the validation file is, if the job has one."""
        return self.validation.path if self.validation is not None else None

    def relabel(self, exc: DataError) -> DataError:
        """``exc`` naming the files by id, the parameter at fault ``validation_file`` when only that file is named."""
        train, val = self.training, self.validation
        only_val = val is not None and str(val.path) in exc.message and str(train.path) not in exc.message
        labels = {train.path: train.id, **({val.path: val.id} if val is not None else {})}
        return relabel(exc, labels, param="validation_file" if only_val else "training_file")


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<suffix>:<job id>``, OpenAI's shape, lower-cased and within the registry's 64 characters.

    The base part is shortened when it does not fit; the job id alone keeps the name unique.
    """
    base_part = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "base"
    room = MAX_MODEL_NAME - len(f"ft::{suffix or ''}:{job_id}")
    return f"ft:{base_part[: max(1, room)]}:{suffix or ''}:{job_id}"


def check_suffix(suffix: str | None) -> str | None:
    """The suffix, or InvalidRequest saying what a suffix may hold."""
    if suffix is not None and not SUFFIX_RULE.fullmatch(suffix):
        raise InvalidRequest(
            f"invalid suffix {suffix!r}: use 1-18 characters a-z, 0-9, '.', '_', '-', starting with a letter "
            "or digit; it becomes part of the model name ft:<base>:<suffix>:<job id>",
            param="suffix",
        )
    return suffix


class JobStore:
    """Jobs, their events and checkpoints, and the files they train on. Synchronous: call it from a thread."""

    def __init__(self, engine: Engine, files: FileStore) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{db.WRITE: True})
        self.files = files

    @classmethod
    def open(cls, database_url: str, data_dir: Path) -> JobStore:
        """Open (creating the tables if needed) the jobs in ``database_url`` and the files under ``data_dir``."""
        engine = db.open_engine(database_url)
        return cls(engine, FileStore(engine, data_dir / FILES_DIR))

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    # -- creating and reading ---------------------------------------------------------------------

    def create(self, spec: JobSpec) -> Job:
        """A new job in ``validating_files``; a file that cannot serve the method is refused at once (400)."""
        check_suffix(spec.suffix)
        self._check_file(spec.training_file, "training_file", spec.method)
        if spec.validation_file is not None:
            self._check_file(spec.validation_file, "validation_file", spec.method)
        job_id = f"{JOB_PREFIX}{secrets.token_hex(6)}"
        with self._writer.begin() as conn:
            conn.execute(
                insert(db.jobs).values(
                    id=job_id,
                    model=spec.model,
                    training_file=spec.training_file,
                    validation_file=spec.validation_file,
                    method=spec.method,
                    hyperparameters=spec.hyperparameters.to_dict(),
                    suffix=spec.suffix,
                    seed=spec.seed,
                    output_model=fine_tuned_model_name(spec.model, spec.suffix, job_id),
                    user_metadata=dict(spec.metadata) if spec.metadata is not None else None,
                    status="validating_files",
                    created_at=int(time.time()),
                    result_files=[],
                )
            )
            self._event(conn, job_id, f"Created fine-tuning job: {job_id}")
            files = spec.training_file + (
                f" and validation file: {spec.validation_file}" if spec.validation_file else ""
            )
            self._event(conn, job_id, f"Validating training file: {files}")
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job ``job_id``; NotFound otherwise."""
        with self._engine.begin() as conn:
            return self._get(conn, job_id)

    def files_of(self, job: Job) -> JobFiles:
        """The files ``job`` trains and validates on; NotFound naming the job's parameter if one is gone."""
        validation = self.files.get(job.validation_file, param="validation_file") if job.validation_file else None
        return JobFiles(self.files.get(job.training_file, param="training_file"), validation)

    def list_jobs(self, *, after: str | None = None, limit: int = 20) -> db.Page[Job]:
        """Jobs, newest first, after the job ``after``."""
        with self._engine.begin() as conn:
            rows, more = db.page(conn, db.jobs, None, after=after, limit=limit)
        return db.Page(tuple(_job(r) for r in rows), more)

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> db.Page[JobEvent]:
        """A job's events, newest first, after the event ``after``."""
        with self._engine.begin() as conn:
            self._get(conn, job_id)
            rows, more = db.page(conn, db.events, db.events.c.job_id == job_id, after=after, limit=limit)
        return db.Page(tuple(_event(r) for r in rows), more)

    def checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> db.Page[JobCheckpoint]:
        """A job's checkpoints, newest first, after the checkpoint ``after``."""
        with self._engine.begin() as conn:
            self._get(conn, job_id)
            rows, more = db.page(conn, db.checkpoints, db.checkpoints.c.job_id == job_id, after=after, limit=limit)
        return db.Page(tuple(_checkpoint(r) for r in rows), more)

    # -- validating_files -> queued ---------------------------------------------------------------

    def pending_validation(self) -> list[str]:
        """Jobs still waiting for their files to be checked, oldest first (e.g. after a restart)."""
        with self._engine.begin() as conn:
            query = select(db.jobs.c.id).where(db.jobs.c.status == "validating_files").order_by(db.jobs.c.seq)
            return list(conn.scalars(query).all())

    def validate(self, job_id: str, *, max_overlap: float = DEFAULT_MAX_OVERLAP) -> Job:
        """Check a job's data as training will (formats, hold-out split, leakage); queue it or fail it."""
        job = self.get(job_id)
        if job.status != "validating_files":
            return job  # cancelled meanwhile, or another gateway got there first
        try:
            files = self.files_of(job)
            try:
                splits = load_splits(files.training.path, job.training_method, val=files.validation_path, seed=job.seed)
                splits.report.raise_if_above(max_overlap)
            except DataError as exc:
                raise files.relabel(exc) from None
        except QuiverError as exc:
            param = exc.param if exc.param in ("training_file", "validation_file") else "training_file"
            # Only from validating_files: another gateway may have validated it and a worker be running it.
            self.fail(job_id, JobError(f"invalid_{param}", exc.message, param), from_statuses=("validating_files",))
            return self.get(job_id)
        with self._writer.begin() as conn:
            if self._move(conn, job_id, ("validating_files",), "queued", train_examples=len(splits.train)):
                self._event(
                    conn,
                    job_id,
                    f"Files validated ({len(splits.train)} training, {len(splits.val)} validation examples), "
                    "moving job to queued state",
                    data={"train_examples": len(splits.train), "validation_examples": len(splits.val)},
                )
        return self.get(job_id)

    # -- cancelling -------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished; a running job's worker stops after its current step."""
        with self._writer.begin() as conn:
            job = self._get(conn, job_id)
            # The move decides, not the status read above: a worker may finish the job in between.
            if not self._move(conn, job_id, db.ACTIVE_STATUSES, "cancelled", finished_at=int(time.time())):
                status = self._get(conn, job_id).status
                raise Conflict(
                    f"fine-tuning job {job_id} has already {status}; only a job that has not finished can be cancelled",
                    code="job_finished",
                )
            tail = "; its worker stops after the current training step" if job.status == "running" else ""
            self._event(conn, job_id, f"Fine-tuning job cancelled{tail}")
        return self.get(job_id)

    # -- what workers do --------------------------------------------------------------------------

    def claim(self, worker: str) -> Job | None:
        """Take the oldest queued job for ``worker`` (``host:pid``) and mark it running; None if there is none."""
        oldest = select(db.jobs.c.id).where(db.jobs.c.status == "queued").order_by(db.jobs.c.seq).limit(1)
        # Idle workers ask often: only a queue with a job in it is worth the write lock.
        with self._engine.begin() as conn:
            if conn.scalar(oldest) is None:
                return None
        now = time.time()
        with self._writer.begin() as conn:
            job_id = conn.scalar(oldest)
            if job_id is None:
                return None
            values: dict[str, Any] = {"worker": worker, "started_at": int(now), "heartbeat_at": now}
            if not self._move(conn, job_id, ("queued",), "running", **values):
                return None  # another worker took it between the two statements
            self._event(conn, job_id, "Fine-tuning job started", data={"worker": worker})
            return self._get(conn, job_id)

    def heartbeat(self, job_id: str, worker: str) -> Status:
        """Record that ``worker`` is alive and still running the job; returns the job's status (cancelled?)."""
        with self._writer.begin() as conn:
            mine = (db.jobs.c.id == job_id) & (db.jobs.c.worker == worker) & (db.jobs.c.status == "running")
            conn.execute(update(db.jobs).where(mine).values(heartbeat_at=time.time()))
            return cast(Status, conn.scalar(select(db.jobs.c.status).where(db.jobs.c.id == job_id)))

    def add_event(self, job_id: str, message: str, **kind: Unpack[EventKind]) -> None:
        """Append an event to a job's log."""
        with self._writer.begin() as conn:
            self._event(conn, job_id, message, **kind)

    def add_checkpoint(self, job_id: str, step: int, model: str, metrics: Mapping[str, float]) -> JobCheckpoint:
        """Record a checkpoint servable as ``model`` (``name@vN``)."""
        c = db.checkpoints
        values = {
            "created_at": int(time.time()),
            "fine_tuned_model_checkpoint": model,
            "metrics": {"step": step, **metrics},
        }
        with self._writer.begin() as conn:
            same_step = (c.c.job_id == job_id) & (c.c.step_number == step)
            # A job resumed after a requeue saves some steps again; the step keeps one row.
            if conn.execute(update(c).where(same_step).values(**values)).rowcount == 0:
                conn.execute(
                    insert(c).values(id=f"ftckpt_{secrets.token_hex(12)}", job_id=job_id, step_number=step, **values)
                )
            self._event(conn, job_id, f"Checkpoint created at step {step}: {model}", data={"step": step})
            row = conn.execute(select(c).where(same_step)).mappings().one()
        return _checkpoint(row)

    def succeed(
        self, job_id: str, worker: str, *, fine_tuned_model: str, trained_tokens: int, result_files: Sequence[str]
    ) -> bool:
        """Mark the job succeeded; False if it was cancelled or given up on meanwhile."""
        with self._writer.begin() as conn:
            moved = self._move(
                conn,
                job_id,
                ("running",),
                "succeeded",
                only_worker=worker,
                finished_at=int(time.time()),
                fine_tuned_model=fine_tuned_model,
                trained_tokens=trained_tokens,
                result_files=list(result_files),
            )
            if moved:
                self._event(conn, job_id, f"New fine-tuned model created: {fine_tuned_model}")
                self._event(conn, job_id, "The job has successfully completed")
            return moved

    def fail(
        self,
        job_id: str,
        error: JobError,
        *,
        only_worker: str | None = None,
        from_statuses: Sequence[str] = db.ACTIVE_STATUSES,
    ) -> bool:
        """Mark a job that has not finished as failed with ``error``; False if it had already finished."""
        with self._writer.begin() as conn:
            moved = self._move(
                conn,
                job_id,
                from_statuses,
                "failed",
                only_worker=only_worker,
                finished_at=int(time.time()),
                error=error.to_dict(),
            )
            if moved:
                self._event(conn, job_id, f"Fine-tuning job failed: {error.message}", level="error")
            return moved

    def requeue(self, job_id: str, worker: str, reason: str) -> bool:
        """Put a running job back in the queue (its worker is shutting down); it resumes from its last checkpoint."""
        with self._writer.begin() as conn:
            moved = self._move(conn, job_id, ("running",), "queued", only_worker=worker, worker=None, heartbeat_at=None)
            if moved:
                self._event(conn, job_id, f"Job queued again: {reason}", level="warn")
            return moved

    def fail_worker(self, worker: str, message: str) -> list[str]:
        """Fail every job ``worker`` was running (it is known to be dead); returns their ids."""
        with self._engine.begin() as conn:
            running = (db.jobs.c.status == "running") & (db.jobs.c.worker == worker)
            ids = list(conn.scalars(select(db.jobs.c.id).where(running)).all())
        error = JobError("worker_lost", message)
        return [job_id for job_id in ids if self.fail(job_id, error, only_worker=worker)]

    def reap(self, host: str, alive: Callable[[int], bool], stale_after_s: float) -> list[str]:
        """Fail running jobs whose worker is gone: a dead process on ``host``, or no heartbeat for too long."""
        now = time.time()
        with self._engine.begin() as conn:
            rows = conn.execute(
                select(db.jobs.c.id, db.jobs.c.worker, db.jobs.c.heartbeat_at).where(db.jobs.c.status == "running")
            ).all()
        failed = []
        for job_id, worker, beat in rows:
            worker_host, _, pid = (worker or "").rpartition(":")
            if worker_host == host and pid.isdigit() and not alive(int(pid)):
                reason = f"the worker process (pid {pid} on {host}) running this job exited without finishing it"
            elif beat is None or now - beat > stale_after_s:
                silent = f"for {now - beat:.0f} s" if beat is not None else "at all"
                reason = (
                    f"the worker {worker} running this job has not reported {silent} (limit {stale_after_s:.0f} s), "
                    "so it is presumed dead"
                )
            else:
                continue
            if self.fail(job_id, JobError("worker_lost", reason), only_worker=worker):
                failed.append(job_id)
        return failed

    # -- internals --------------------------------------------------------------------------------

    def _check_file(self, file_id: str, param: str, method: Method) -> StoredFile:
        def invalid(why: str) -> InvalidRequest:
            return InvalidRequest(f"invalid {param}: {why}", param=param, code=f"invalid_{param}")

        try:
            file = self.files.get(file_id, param=param)
        except NotFound:
            raise invalid(f"{file_id} does not exist; upload it with POST /v1/files (purpose 'fine-tune')") from None
        if file.purpose != PURPOSE_FINE_TUNE:
            raise invalid(
                f"{file_id} has purpose {file.purpose!r}; fine-tuning takes files uploaded with purpose 'fine-tune'"
            )
        pairs = file.format == DataFormat.PREFERENCE.value
        if method == "dpo" and not pairs:
            label = DataFormat(file.format).label if file.format else "unknown"
            raise invalid(
                f"DPO trains on preference pairs ('prompt'/'chosen'/'rejected'), but {file_id} holds {label} records"
            )
        if method == "supervised" and pairs:
            raise invalid(
                f"{file_id} holds preference pairs, which train with method type 'dpo'; supervised fine-tuning "
                "trains on conversations"
            )
        return file

    def _get(self, conn: Connection, job_id: str) -> Job:
        row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFound(f"fine-tuning job {job_id} does not exist", param="fine_tuning_job_id", code="job_not_found")
        return _job(row)

    def _move(
        self,
        conn: Connection,
        job_id: str,
        from_statuses: Sequence[str],
        to: Status,
        *,
        only_worker: str | None = None,
        **values: Any,
    ) -> bool:
        condition = (db.jobs.c.id == job_id) & db.jobs.c.status.in_(from_statuses)
        if only_worker is not None:
            condition &= db.jobs.c.worker == only_worker
        return conn.execute(update(db.jobs).where(condition).values(status=to, **values)).rowcount == 1

    def _event(self, conn: Connection, job_id: str, message: str, **kind: Unpack[EventKind]) -> None:
        data = kind.get("data")
        conn.execute(
            insert(db.events).values(
                id=f"ftevent-{secrets.token_hex(12)}",
                job_id=job_id,
                created_at=int(time.time()),
                level=kind.get("level", "info"),
                type=kind.get("type", "message"),
                message=message,
                data=dict(data) if data is not None else None,
            )
        )


def _job(row: RowMapping) -> Job:
    error = row["error"]
    return db.from_row(
        Job,
        row,
        hyperparameters=Hyperparameters.from_dict(row["hyperparameters"]),
        metadata=row["user_metadata"],
        error=JobError(error["code"], error["message"], error.get("param")) if error else None,
        result_files=tuple(row["result_files"] or ()),
    )


def _event(row: RowMapping) -> JobEvent:
    return db.from_row(JobEvent, row)


def _checkpoint(row: RowMapping) -> JobCheckpoint:
    return db.from_row(JobCheckpoint, row)
