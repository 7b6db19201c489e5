"""Wire models of the gateway's HTTP API (pydantic). Routes stay thin; logic lives elsewhere.

Request models check only what the gateway itself needs; every other OpenAI parameter passes
through to vLLM untouched (``extra="allow"``), and vLLM's own validation errors come back as 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quiver.errors import InvalidRequest


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


class AdapterPublic(BaseModel):
    """An adapter with its versions and aliases."""

    object: Literal["adapter"] = "adapter"
    name: str
    created_at: datetime
    latest: int
    aliases: dict[str, int]
    versions: list[VersionPublic]


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


class AliasUpdate(BaseModel):
    """Body of ``PUT /v1/adapters/{name}/aliases/{alias}``."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
