"""The fine-tuning jobs API (``/v1/fine_tuning/jobs``, OpenAI's shape) and its running parts in the gateway.

Routes stay thin: jobs live in ``jobs.queue.JobStore`` (SQL) and train in worker processes
(``gateway.workers``). Here a new job's files are validated in a thread, off the event loop; jobs a
stopped gateway left in ``validating_files`` are validated when the next one starts.

Workers train with torch, which the gateway-only install lacks. Such a gateway asked for workers
(``QUIVER_FINE_TUNING_WORKERS``, default 1) starts none and refuses new jobs with a 501 that names the
extra; with ``QUIVER_FINE_TUNING_WORKERS=0`` it queues them for workers run elsewhere (``python -m
training.worker`` in the full install, on the same database and data dir).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request

from access.keys import FINE_TUNE
from core import extras
from core.errors import InvalidRequest, ModelNotFound, NotInstalled, Unavailable
from gateway.auth import requires
from gateway.deps import Gateway, GatewayDep
from gateway.protocol import (
    CheckpointList,
    CheckpointMetrics,
    CheckpointPublic,
    DpoHyperparametersPublic,
    DpoPublic,
    FineTuningJobCreate,
    FineTuningJobList,
    FineTuningJobPublic,
    HyperparametersIn,
    HyperparametersPublic,
    JobErrorPublic,
    JobEventList,
    JobEventPublic,
    MethodPublic,
    SupervisedPublic,
)
from gateway.settings import Settings
from gateway.workers import WorkerPool
from jobs.queue import Job, JobCheckpoint, JobSpec, JobStore, Method, resolve_hyperparameters
from jobs.workers import WorkerConfig

log = logging.getLogger("quiver.fine_tuning")

T = TypeVar("T")


class FineTuning:
    """The job store, the validations in flight and the worker processes of one gateway."""

    def __init__(
        self, jobs: JobStore, workers: WorkerPool | None, stop_timeout_s: float, refusal: str | None = None
    ) -> None:
        self.jobs = jobs
        self.workers = workers
        # Why new jobs are refused: workers were asked for, but this install cannot run them.
        self.refusal = refusal
        self._stop_timeout_s = stop_timeout_s
        self._validations: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, base_model_dir: Path | None) -> FineTuning:
        """Open the store, start the workers (when enabled and the base model's directory is known)."""
        jobs = await anyio.to_thread.run_sync(JobStore.open, settings.registry_url, settings.data_dir)
        workers = None
        refusal = training_not_installed() if settings.fine_tuning_workers else None
        if refusal is not None:
            log.warning("fine-tuning workers not started: %s", refusal)
        elif settings.fine_tuning_workers and base_model_dir is None:
            log.warning(
                "fine-tuning workers not started: the base model's directory is unknown (set "
                "QUIVER_BASE_MODEL_PATH); fine-tuning jobs wait in the queue"
            )
        elif settings.fine_tuning_workers and base_model_dir is not None:
            config = WorkerConfig(
                database_url=settings.registry_url,
                data_dir=settings.data_dir,
                store_dir=settings.adapter_store,
                base_model_path=base_model_dir,
                max_lora_rank=settings.max_lora_rank,
                poll_s=settings.fine_tuning_poll_s,
                heartbeat_s=settings.fine_tuning_heartbeat_s,
                stale_after_s=settings.fine_tuning_stale_after_s,
                exit_with_parent=True,
            )
            workers = WorkerPool(config, settings.fine_tuning_workers, jobs, settings.data_dir / "logs")
        fine_tuning = cls(jobs, workers, settings.fine_tuning_stop_timeout_s, refusal)
        try:
            if workers is not None:
                await anyio.to_thread.run_sync(workers.start)
                fine_tuning._watch = asyncio.create_task(workers.watch(), name="fine-tuning-workers")
            # Jobs a stopped gateway left half-way: their files are checked now.
            for job_id in await fine_tuning.call(jobs.pending_validation):
                fine_tuning.validate_soon(job_id)
        except BaseException:
            # A gateway that fails to start must not leave worker processes or connections behind.
            await fine_tuning.stop()
            raise
        return fine_tuning

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking store call in a worker thread."""
        return await anyio.to_thread.run_sync(fn, *args)

    def validate_soon(self, job_id: str) -> None:
        """Check a new job's files in the background; it moves to ``queued`` or ``failed``."""
        task = asyncio.create_task(self._validate(job_id), name=f"validate-{job_id}")
        self._validations.add(task)
        task.add_done_callback(self._validations.discard)

    async def _validate(self, job_id: str) -> None:
        try:
            await self.call(self.jobs.validate, job_id)
        except Exception:
            log.exception("validating the files of %s failed; it stays in validating_files until a restart", job_id)

    async def validations_done(self) -> None:
        """Wait until every validation started so far has moved its job on."""
        await asyncio.gather(*self._validations)

    async def stop(self) -> None:
        """Stop the workers (running jobs go back to the queue), let validations finish, close the store."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        try:
            await self.validations_done()
            if self.workers is not None:
                await self.workers.stop(self._stop_timeout_s)
        finally:
            await self.call(self.jobs.close)


def training_not_installed() -> str | None:
    """Why this install cannot run fine-tuning workers (the gateway-only install), or None when it can."""
    try:
        extras.require("fine-tuning in worker processes beside the gateway", "ml", "training")
    except NotInstalled as exc:
        return (
            f"{exc.message}; or run the workers elsewhere (python -m training.worker, on this gateway's database and "
            f"data dir) and set QUIVER_FINE_TUNING_WORKERS=0, so that this gateway queues jobs for them"
        )
    return None


async def fine_tuning_of(request: Request) -> FineTuning:
    """The running fine-tuning parts."""
    fine_tuning: FineTuning = request.app.state.fine_tuning
    return fine_tuning


FineTuningDep = Annotated[FineTuning, Depends(fine_tuning_of)]

router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(requires(FINE_TUNE))])


def base_model_of(gateway: Gateway, model: str) -> str:
    """The served base model's name if ``model`` names it; a 404 (or 400 for an adapter) otherwise."""
    names = gateway.router.base_names()
    if model in names:
        if gateway.router.base_model is None:
            raise Unavailable(
                "vLLM has not answered yet, so the base model's name is not known", code="upstream_unavailable"
            )
        return gateway.router.base_model
    if model in gateway.registry.catalog.model_ids():
        raise InvalidRequest(
            f"model {model!r} is a fine-tuned adapter; fine-tuning starts from the served base model, which answers "
            f"to {', '.join(names)}",
            param="model",
            code="model_not_supported",
        )
    raise ModelNotFound(
        f"The model `{model}` does not exist here; fine-tuning starts from the served base model, which answers "
        f"to {', '.join(names)}",
        param="model",
    )


def job_spec(body: FineTuningJobCreate, model: str) -> JobSpec:
    """The job a request asks for, ``auto`` hyperparameters resolved."""
    method: Method = body.method.type if body.method is not None else "supervised"
    given: HyperparametersIn | None = body.hyperparameters
    if body.method is not None:
        if body.hyperparameters is not None:
            raise InvalidRequest(
                "give hyperparameters under method.<type>.hyperparameters or at the top level, not both",
                param="hyperparameters",
            )
        other = body.method.supervised if method == "dpo" else body.method.dpo
        if other is not None:
            raise InvalidRequest(
                f"method type is {method!r} but method.{'supervised' if method == 'dpo' else 'dpo'} is given",
                param="method",
            )
        chosen = body.method.dpo if method == "dpo" else body.method.supervised
        given = chosen.hyperparameters if chosen is not None else None
    if body.integrations:
        raise InvalidRequest("integrations (Weights & Biases) are not supported here", param="integrations")
    return JobSpec(
        model=model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=method,
        hyperparameters=resolve_hyperparameters(method, given.model_dump() if given is not None else {}),
        suffix=body.suffix,
        # OpenAI draws a seed when none is given, and shows it, so the run can be repeated.
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata=body.metadata,
    )


def job_public(job: Job) -> FineTuningJobPublic:
    """Wire form of a job."""
    hp = job.hyperparameters
    shared = HyperparametersPublic(
        n_epochs=hp.n_epochs, batch_size=hp.batch_size, learning_rate_multiplier=hp.learning_rate_multiplier
    )
    if job.method == "dpo":
        beta = hp.beta if hp.beta is not None else 0.0
        dpo = DpoPublic(hyperparameters=DpoHyperparametersPublic(**shared.model_dump(), beta=beta))
        method = MethodPublic(type="dpo", dpo=dpo)
    else:
        method = MethodPublic(type="supervised", supervised=SupervisedPublic(hyperparameters=shared))
    return FineTuningJobPublic(
        id=job.id,
        created_at=job.created_at,
        error=JobErrorPublic(code=job.error.code, message=job.error.message, param=job.error.param)
        if job.error
        else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=shared,
        model=job.model,
        result_files=list(job.result_files),
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        metadata=dict(job.metadata) if job.metadata is not None else None,
        method=method,
        user_provided_suffix=job.suffix,
    )


def checkpoint_public(checkpoint: JobCheckpoint) -> CheckpointPublic:
    """Wire form of a checkpoint."""
    known = CheckpointMetrics.model_fields
    return CheckpointPublic(
        id=checkpoint.id,
        created_at=checkpoint.created_at,
        fine_tuned_model_checkpoint=checkpoint.fine_tuned_model_checkpoint,
        fine_tuning_job_id=checkpoint.job_id,
        metrics=CheckpointMetrics(**{k: v for k, v in checkpoint.metrics.items() if k in known}),
        step_number=checkpoint.step_number,
    )


Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=FineTuningJobPublic)
async def create_job(body: FineTuningJobCreate, gateway: GatewayDep, fine_tuning: FineTuningDep) -> FineTuningJobPublic:
    """Create a job from uploaded files; it starts in ``validating_files``."""
    if fine_tuning.refusal is not None:
        raise NotInstalled(fine_tuning.refusal, code="fine_tuning_not_installed")
    spec = job_spec(body, base_model_of(gateway, body.model))
    job = await fine_tuning.call(fine_tuning.jobs.create, spec)
    fine_tuning.validate_soon(job.id)
    return job_public(job)


async def seen_models(gateway: Gateway, jobs: Sequence[Job]) -> None:
    """Refresh the registry view when a job shown has a model: the worker pushed it from another process,
    and a client told ``succeeded`` may ask this gateway for that model in its very next request."""
    if any(j.fine_tuned_model for j in jobs):
        await gateway.registry.refresh()


@router.get("", response_model=FineTuningJobList)
async def list_jobs(
    gateway: GatewayDep, fine_tuning: FineTuningDep, after: str | None = None, limit: Limit = 20
) -> FineTuningJobList:
    """Jobs, newest first; ``after`` is the last id of the previous page."""
    page = await fine_tuning.call(lambda: fine_tuning.jobs.list_jobs(after=after, limit=limit))
    await seen_models(gateway, page.items)
    return FineTuningJobList(data=[job_public(j) for j in page.items], has_more=page.has_more)


@router.get("/{job_id}", response_model=FineTuningJobPublic)
async def get_job(job_id: str, gateway: GatewayDep, fine_tuning: FineTuningDep) -> FineTuningJobPublic:
    """One job, or 404."""
    job = await fine_tuning.call(fine_tuning.jobs.get, job_id)
    await seen_models(gateway, [job])
    return job_public(job)


@router.get("/{job_id}/events", response_model=JobEventList)
async def list_events(
    job_id: str, fine_tuning: FineTuningDep, after: str | None = None, limit: Limit = 20
) -> JobEventList:
    """A job's events, newest first."""
    page = await fine_tuning.call(lambda: fine_tuning.jobs.events(job_id, after=after, limit=limit))
    data = [
        JobEventPublic(
            id=e.id,
            created_at=e.created_at,
            level=e.level,
            message=e.message,
            data=dict(e.data) if e.data is not None else None,
            type=e.type,
        )
        for e in page.items
    ]
    return JobEventList(data=data, has_more=page.has_more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
async def list_checkpoints(
    job_id: str, gateway: GatewayDep, fine_tuning: FineTuningDep, after: str | None = None, limit: Limit = 10
) -> CheckpointList:
    """A job's checkpoints, newest first; each is servable under its ``fine_tuned_model_checkpoint``."""
    page = await fine_tuning.call(lambda: fine_tuning.jobs.checkpoints(job_id, after=after, limit=limit))
    if page.items:
        await gateway.registry.refresh()
    data = [checkpoint_public(c) for c in page.items]
    return CheckpointList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.post("/{job_id}/cancel", response_model=FineTuningJobPublic)
async def cancel_job(job_id: str, fine_tuning: FineTuningDep) -> FineTuningJobPublic:
    """Cancel a job that has not finished (409 otherwise); a running one stops after its current step."""
    return job_public(await fine_tuning.call(fine_tuning.jobs.cancel, job_id))
