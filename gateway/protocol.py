"""Wire models of the gateway's HTTP API (pydantic). Routes stay thin; logic lives elsewhere.

Request models check only what the gateway itself needs; every other OpenAI parameter passes
through to vLLM untouched (``extra="allow"``), and vLLM's own validation errors come back as 400.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from core.errors import InvalidRequest, QuiverError


def error_response(exc: QuiverError) -> JSONResponse:
    """The one place a QuiverError becomes an HTTP answer: the OpenAI error body, its status and headers."""
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """The first pydantic error (of a body, form or path) as a 400 naming the parameter."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    param = ".".join(loc) or None
    return InvalidRequest(f"{param}: {first['msg']}" if param else str(first["msg"]), param=param)


class _PassThrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_PassThrough):
    """One chat message; content may be a string or a list of parts."""

    role: str
    content: str | list[Any] | None = None


class StreamOptions(_PassThrough):
    """OpenAI ``stream_options``."""

    include_usage: bool | None = None


class _GenerationRequest(_PassThrough):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionPublic(BaseModel):
    """One immutable adapter version as the admin API shows it."""

    version: int
    model: str
    sha256: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    created_at: datetime
    aliases: list[str]
    manifest: dict[str, Any] | None = Field(None, description="quiver_manifest.json, on GET /v1/adapters/{name}")
    evaluation: dict[str, Any] | None = Field(None, description="The newest eval report, on GET /v1/adapters/{name}")


class RoutingPublic(BaseModel):
    """How the gateway routes to an adapter."""

    description: str | None = Field(None, description='What the adapter does; model="auto" matches prompts to it.')
    examples: list[str] = Field(default_factory=list, description='Example prompts model="auto" matches against.')
    fallback: list[str] | None = Field(
        None,
        description="Targets tried in order when the adapter cannot answer (rag:COLLECTION, frontier:NAME, an "
        "adapter, base); null: the gateway's default chain; []: none.",
    )


class AdapterPublic(BaseModel):
    """An adapter with its versions and aliases."""

    object: Literal["adapter"] = "adapter"
    name: str
    tenant: str | None = Field(None, description="The tenant whose keys see it; null: shared with every tenant.")
    created_at: datetime
    latest: int
    aliases: dict[str, int]
    routing: RoutingPublic
    versions: list[VersionPublic]


class RoutingUpdate(RoutingPublic):
    """Body of ``PATCH /v1/adapters/{name}``: the fields given are changed, the others kept."""

    model_config = ConfigDict(extra="forbid")


class AdapterList(BaseModel):
    """``GET /v1/adapters``."""

    object: Literal["list"] = "list"
    data: list[AdapterPublic]


class PushPublic(BaseModel):
    """Answer to ``POST /v1/adapters``: the version, and whether this upload created it."""

    object: Literal["adapter.version"] = "adapter.version"
    name: str
    created: bool
    version: VersionPublic


class DeploymentPublic(BaseModel):
    """A version served by a dedicated server of its own (``quiver deploy merged``)."""

    object: Literal["deployment"] = "deployment"
    model: str = Field(description="The version deployed, name@vN; requests for it go to the server")
    name: str
    version: int
    url: str
    served_model: str = Field(description="The model name the server answers to")
    pid: int | None = Field(None, description="The server's process, when quiver started it")
    created_at: datetime


class DeploymentList(BaseModel):
    """``GET /v1/deployments``."""

    object: Literal["list"] = "list"
    data: list[DeploymentPublic]


class AliasUpdate(BaseModel):
    """Body of ``PUT /v1/adapters/{name}/aliases/{alias}``."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    force: bool = Field(False, description="Promote to prod even without a passing eval report.")


# -- files and fine-tuning jobs, in OpenAI's shapes ---------------------------------------------------


def _auto_or_number(value: object, *, integer: bool, high: float, low: float | None = None) -> object:
    """``"auto"``, or the number if it is in range; one clear message otherwise (pydantic's own would name
    each member of the union)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        in_range = (number >= low if low is not None else number > 0) and number <= high
        if in_range and (not integer or number.is_integer()):
            return int(number) if integer else number
    kind = "an integer" if integer else "a number"
    bounds = f"from {low:g} to {high:g}" if low is not None else f"above 0 and at most {high:g}"
    raise PydanticCustomError(
        "auto_or_number",
        "must be 'auto' or {kind} {bounds}, got {value}",
        {"kind": kind, "bounds": bounds, "value": repr(value)},
    )


class HyperparametersIn(BaseModel):
    """A supervised job's hyperparameters; each is ``"auto"`` (the default) or a value in range."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"

    @field_validator("n_epochs", mode="before")
    @classmethod
    def _epochs(cls, value: object) -> object:
        return _auto_or_number(value, integer=True, low=1, high=50)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, value: object) -> object:
        return _auto_or_number(value, integer=True, low=1, high=256)

    @field_validator("learning_rate_multiplier", mode="before")
    @classmethod
    def _lr(cls, value: object) -> object:
        return _auto_or_number(value, integer=False, high=10)


class DpoHyperparametersIn(HyperparametersIn):
    """A DPO job's hyperparameters: the supervised ones and ``beta``."""

    beta: float | Literal["auto"] = "auto"

    @field_validator("beta", mode="before")
    @classmethod
    def _beta(cls, value: object) -> object:
        return _auto_or_number(value, integer=False, high=2)


class SupervisedIn(BaseModel):
    """``method.supervised``."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: HyperparametersIn | None = None


class DpoIn(BaseModel):
    """``method.dpo``."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparametersIn | None = None


class MethodIn(BaseModel):
    """``method``: supervised fine-tuning or DPO (reinforcement fine-tuning is not offered)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    method: MethodIn | None = None
    hyperparameters: HyperparametersIn | None = Field(None, description="Deprecated by OpenAI in favour of method.")
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)


class FilePublic(BaseModel):
    """OpenAI's ``file`` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    """``GET /v1/files``."""

    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    """``DELETE /v1/files/{file_id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobErrorPublic(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None


class HyperparametersPublic(BaseModel):
    """A job's resolved hyperparameters."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class DpoHyperparametersPublic(HyperparametersPublic):
    """A DPO job's resolved hyperparameters."""

    beta: float


class SupervisedPublic(BaseModel):
    """``method.supervised`` of a job."""

    hyperparameters: HyperparametersPublic


class DpoPublic(BaseModel):
    """``method.dpo`` of a job."""

    hyperparameters: DpoHyperparametersPublic


class MethodPublic(BaseModel):
    """``method`` of a job."""

    type: Literal["supervised", "dpo"]
    supervised: SupervisedPublic | None = None
    dpo: DpoPublic | None = None


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class FineTuningJobPublic(BaseModel):
    """OpenAI's ``fine_tuning.job`` object."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: JobErrorPublic | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: HyperparametersPublic
    model: str
    organization_id: str = "quiver"
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None
    method: MethodPublic
    user_provided_suffix: str | None


class FineTuningJobList(BaseModel):
    """``GET /v1/fine_tuning/jobs``."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobPublic]
    has_more: bool


class JobEventPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.event`` object."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class JobEventList(BaseModel):
    """``GET /v1/fine_tuning/jobs/{id}/events``."""

    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class CheckpointMetrics(BaseModel):
    """A checkpoint's metrics: the last training and validation values logged at or before its step."""

    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class CheckpointPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint`` object; ``fine_tuned_model_checkpoint`` is servable."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    """``GET /v1/fine_tuning/jobs/{id}/checkpoints``."""

    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class UsagePublic(BaseModel):
    """One minute of one key's requests to one target."""

    minute: datetime
    tenant: str
    key_id: str = Field(description='The API key\'s id; "" for requests made while the gateway ran open.')
    served_by: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageList(BaseModel):
    """``GET /v1/usage``: rows ordered by minute."""

    object: Literal["list"] = "list"
    data: list[UsagePublic]
