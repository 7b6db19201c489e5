"""The routing file (``QUIVER_ROUTING_FILE``, TOML): rules, the ``auto`` router, frontiers, the default fallback.

    fallback = ["rag:handbook", "frontier:openai"]     # when an adapter has no chain of its own

    [auto]                                              # model="auto"
    threshold = 0.35
    default = "base"

    [[rules]]                                           # first match wins
    name = "triage-header"
    match = { header = { "x-quiver-route" = "triage" } }
    model = "support-triage@prod"

    [frontiers.openai]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    models = { "gpt-4o-mini" = "gpt-4o-mini" }

Targets in a chain are written as model strings: an adapter (``name``, ``name@vN``, ``name@alias``),
``base``, ``rag:COLLECTION`` or ``frontier:NAME``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RAG_PREFIX = "rag:"
FRONTIER_PREFIX = "frontier:"
# What a request's ``x-quiver-route`` header is matched against by rules (any header can be).
ROUTE_HEADER = "x-quiver-route"


class FrontierConfig(BaseModel):
    """One ``[frontiers.NAME]`` table: an OpenAI-compatible upstream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    base_url: str = Field(description="The API's base URL, version included (https://api.openai.com/v1).")
    models: dict[str, str] = Field(
        default_factory=dict, description="Client model name -> upstream model name; these names route here."
    )
    default_model: str | None = Field(None, description="Upstream model used when this is a fallback target.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    context_tokens: int = Field(128_000, gt=0, description="The upstream model's context window, in tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Waiting for the upstream's next byte.")
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, description="Retries of a 429/503 whose Retry-After is short enough.")
    max_retry_wait_s: float = Field(10.0, ge=0, description="Longest Retry-After worth waiting for.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _has_a_model(self) -> FrontierConfig:
        if self.upstream_model(None) is None:
            raise ValueError("set default_model or at least one entry in models")
        return self

    def upstream_model(self, requested: str | None) -> str | None:
        """The upstream's name for ``requested``; the default when it is not one of ours."""
        if requested is not None and requested in self.models:
            return self.models[requested]
        return self.default_model or next(iter(self.models.values()), None)


class RuleMatch(BaseModel):
    """What a request must carry for a rule to apply; every given part must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header: dict[str, str] = Field(default_factory=dict, description='Header -> value ("*": any value).')
    metadata: dict[str, str] = Field(default_factory=dict, description="The request body's metadata fields.")
    model: str | None = Field(None, description="The model string the client sent.")
    tenant: str | None = Field(None, description="The tenant of the request's API key.")
    key: str | None = Field(None, description="The id of the request's API key (``quiver keys list``).")

    @field_validator("header")
    @classmethod
    def _lower(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in value.items()}

    def matches(
        self,
        headers: Mapping[str, str],
        metadata: Mapping[str, Any],
        model: str,
        tenant: str | None = None,
        key: str | None = None,
    ) -> bool:
        """Whether a request with these headers (lower-case names), metadata, model and caller matches."""
        if self.model is not None and self.model != model:
            return False
        if (self.tenant is not None and self.tenant != tenant) or (self.key is not None and self.key != key):
            return False
        for name, want in self.header.items():
            got = headers.get(name)
            if got is None or (want != "*" and got != want):
                return False
        return all(str(metadata.get(k)) == v for k, v in self.metadata.items())


class Rule(BaseModel):
    """A ``[[rules]]`` entry: requests that match go to ``model``, with ``fallback`` if given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    match: RuleMatch
    model: str
    fallback: tuple[str, ...] | None = None


class AutoConfig(BaseModel):
    """The ``[auto]`` table: the semantic router behind ``model="auto"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.35, ge=-1, le=1, description="Lowest cosine similarity that picks an adapter.")
    default: str = Field("base", description="Where a prompt goes when no adapter matches well enough.")


class RoutingPolicy(BaseModel):
    """The parsed routing file; the defaults describe a gateway with no file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fallback: tuple[str, ...] = ()
    auto: AutoConfig = AutoConfig.model_validate({})
    rules: tuple[Rule, ...] = ()
    frontiers: dict[str, FrontierConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_resolve(self) -> RoutingPolicy:
        named = {name: f.model_copy(update={"name": name}) for name, f in self.frontiers.items()}
        object.__setattr__(self, "frontiers", named)
        chains = [("fallback", self.fallback)] + [(f"rule {r.name!r}", r.fallback or ()) for r in self.rules]
        targets = [(where, t) for where, chain in chains for t in chain]
        targets += [(f"rule {r.name!r}", r.model) for r in self.rules] + [("auto.default", self.auto.default)]
        for where, target in targets:
            self.check_target(target, where)
        return self

    def check_target(self, target: str, where: str) -> None:
        """A ValueError when ``target`` names a frontier that is not configured or an empty collection."""
        if target.startswith(FRONTIER_PREFIX) and target[len(FRONTIER_PREFIX) :] not in self.frontiers:
            raise ValueError(f"{where}: {target!r} names no configured frontier (have: {sorted(self.frontiers)})")
        if target.startswith(RAG_PREFIX) and not target[len(RAG_PREFIX) :]:
            raise ValueError(f"{where}: {target!r} needs a collection name")

    @classmethod
    def load(cls, path: Path | None) -> RoutingPolicy:
        """Read and check the routing file; a ValueError names the file and what is wrong."""
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read routing file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"routing file {path} is not valid TOML: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"routing file {path}: {problems}") from None

    def rule_for(
        self,
        headers: Mapping[str, str],
        metadata: Mapping[str, Any],
        model: str,
        tenant: str | None = None,
        key: str | None = None,
    ) -> Rule | None:
        """The first rule this request matches."""
        return next((r for r in self.rules if r.match.matches(headers, metadata, model, tenant, key)), None)

    def frontier_for_model(self, model: str) -> FrontierConfig | None:
        """The frontier that serves ``model`` by name (``frontier:NAME`` or one of its mapped names)."""
        if model.startswith(FRONTIER_PREFIX):
            return self.frontiers.get(model[len(FRONTIER_PREFIX) :])
        return next((f for f in self.frontiers.values() if model in f.models), None)
