"""From a request to a Plan: the ordered targets that may answer it, and why they were chosen.

A request's model string is first matched against the routing file's rules (a header, metadata,
the model asked for); ``auto`` is then settled by the semantic router. What remains names the
primary: the base model, an adapter version (on a merged deployment while one is healthy, then on
the replicas, best placed first), a RAG collection, or a frontier API. The fallback chain follows:
the rule's, else the adapter's own, else the gateway's default. A target that cannot even be tried
(no healthy replica, every replica overloaded) is in the plan as ``Skipped`` with its reason, so the
serving loop reports why the answer came from further down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from adapters import AdapterVersion, Catalog
from core.errors import ModelNotFound, QuiverError, Unavailable
from gateway.auth import OPEN, Principal
from gateway.frontier import Frontier
from gateway.policy import FRONTIER_PREFIX, RAG_PREFIX, RoutingPolicy
from gateway.pool import Member, ReplicaPool
from gateway.upstream import Upstream, VllmReplica

log = logging.getLogger("quiver.router")

BASE_ALIAS = "base"
AUTO = "auto"


@dataclass(frozen=True)
class _OnReplica:
    """Something answered by a replica of the LoRA pool, whose context window is the replica's."""

    member: Member

    @property
    def context_tokens(self) -> int | None:
        return self.member.replica.max_model_len

    @property
    def upstream(self) -> Upstream:
        return self.member.replica


@dataclass(frozen=True)
class BaseOnReplica(_OnReplica):
    """The shared base model itself, on a vLLM replica."""

    upstream_model: str

    @property
    def served_by(self) -> str:
        return self.upstream_model


@dataclass(frozen=True)
class AdapterOnReplica(_OnReplica):
    """One adapter version, loaded on demand into a vLLM replica."""

    version: AdapterVersion

    @property
    def upstream_model(self) -> str:
        return self.version.lora_name

    @property
    def served_by(self) -> str:
        return self.version.lora_name


@dataclass(frozen=True)
class MergedDeployment:
    """An adapter version merged into the base and served by a vLLM of its own (LoRA off)."""

    server: VllmReplica
    version: AdapterVersion
    upstream_model: str
    member: None = None

    @property
    def context_tokens(self) -> int | None:
        return self.server.max_model_len

    @property
    def upstream(self) -> Upstream:
        return self.server

    @property
    def served_by(self) -> str:
        return f"merged:{self.version.lora_name}"


@dataclass(frozen=True)
class RagOnReplica(_OnReplica):
    """Retrieval from a collection, answered by the base model on a vLLM replica."""

    collection: str
    upstream_model: str

    @property
    def served_by(self) -> str:
        return f"{RAG_PREFIX}{self.collection}"


@dataclass(frozen=True)
class OnFrontier:
    """A frontier API, under the upstream's name for the model."""

    frontier: Frontier
    upstream_model: str
    member: None = None

    @property
    def context_tokens(self) -> int | None:
        return self.frontier.config.context_tokens

    @property
    def upstream(self) -> Upstream:
        return self.frontier

    @property
    def served_by(self) -> str:
        return f"{FRONTIER_PREFIX}{self.frontier.config.name}"


@dataclass(frozen=True)
class Skipped:
    """A target the plan could not even try, and why (a fallback reason)."""

    served_by: str
    reason: str
    error: QuiverError


Target = BaseOnReplica | AdapterOnReplica | MergedDeployment | RagOnReplica | OnFrontier
Step = Target | Skipped


@dataclass(frozen=True)
class RouteRequest:
    """What routing looks at: the model string, the headers (lower-case names), metadata and the prompt."""

    model: str
    headers: Mapping[str, str]
    metadata: Mapping[str, Any]
    prompt: str
    principal: Principal = OPEN


@dataclass(frozen=True)
class Plan:
    """What a request asked for, how the route was chosen, and the steps to try in order."""

    model: str
    route: str
    steps: tuple[Step, ...]

    @property
    def first(self) -> Target | None:
        """The target tried first: the first step not skipped (None when every one was)."""
        return next((step for step in self.steps if not isinstance(step, Skipped)), None)


class Collections(Protocol):
    """The RAG collections the router can send requests to."""

    def has(self, collection: str) -> bool: ...

    def names(self) -> list[str]: ...


class AutoRouter(Protocol):
    """Picks an adapter for a prompt (``model="auto"``)."""

    async def choose(self, prompt: str, catalog: Catalog) -> tuple[str | None, float]: ...


class MergedServers(Protocol):
    """Healthy merged deployments by ``name@vN``."""

    def healthy(self, lora_name: str) -> tuple[VllmReplica, str] | None: ...


class Router:
    """Turns requests into plans against the current registry snapshot and replica states."""

    def __init__(
        self,
        pool: ReplicaPool,
        catalog: Callable[[], Catalog],
        base_model: str | None,
        *,
        policy: RoutingPolicy | None = None,
        frontiers: Mapping[str, Frontier] | None = None,
        collections: Collections | None = None,
        auto: AutoRouter | None = None,
        merged: MergedServers | None = None,
    ) -> None:
        self.pool = pool
        self._catalog = catalog
        self._base_model = base_model
        self.policy = policy or RoutingPolicy()
        self.frontiers = dict(frontiers or {})
        self._collections = collections
        self._auto = auto
        self._merged = merged

    @property
    def base_model(self) -> str | None:
        """The base model's name: configured, else what vLLM reports."""
        if self._base_model:
            return self._base_model
        return next((m.replica.served_model for m in self.pool.members if m.replica.served_model), None)

    def base_names(self) -> tuple[str, ...]:
        """Every name the base model answers to."""
        return (self.base_model, BASE_ALIAS) if self.base_model else (BASE_ALIAS,)

    async def plan(self, request: RouteRequest) -> Plan:
        """The plan for a request; ModelNotFound when nothing serves its model."""
        model, route, chain = request.model, "model", None
        caller = request.principal
        rule = self.policy.rule_for(request.headers, request.metadata, model, caller.tenant, caller.key_id)
        if rule is not None:
            model, route, chain = rule.model, f"rule:{rule.name}", rule.fallback
        # Another tenant's adapters do not exist for this caller: not found, never forbidden.
        catalog = self._catalog().visible_to(caller.visible_tenant)
        if model == AUTO:
            model, route = await self._auto_route(request.prompt, route, catalog)
        steps = self._steps(model, catalog, requested=request.model)
        if chain is None:
            chain = self._default_chain(model, catalog)
        seen = {s.served_by for s in steps}
        for entry in chain:
            try:
                more = self._steps(entry, catalog, requested=request.model)
            except ModelNotFound as exc:
                log.warning("fallback target %r of %r is not servable: %s", entry, model, exc.message)
                continue
            steps += [s for s in more if s.served_by not in seen]
            seen |= {s.served_by for s in more}
        return Plan(request.model, route, tuple(steps))

    async def _auto_route(self, prompt: str, route: str, catalog: Catalog) -> tuple[str, str]:
        prefix = "" if route == "model" else f"{route},"
        if self._auto is not None:
            chosen, score = await self._auto.choose(prompt, catalog)
            if chosen is not None:
                return chosen, f"{prefix}auto:{chosen};score={score:.2f}"
            default = self.policy.auto.default
            return default, f"{prefix}auto:default;score={score:.2f}"
        return self.policy.auto.default, f"{prefix}auto:default"

    def _default_chain(self, model: str, catalog: Catalog) -> tuple[str, ...]:
        if not self._is_special(model):
            adapter = catalog.adapters.get(Catalog.adapter_name(model))
            if adapter is not None and adapter.routing.fallback is not None:
                return adapter.routing.fallback
        return self.policy.fallback

    def _is_special(self, model: str) -> bool:
        return (
            model in self.base_names()
            or model.startswith((RAG_PREFIX, FRONTIER_PREFIX))
            or self.policy.frontier_for_model(model) is not None
        )

    def _steps(self, model: str, catalog: Catalog, *, requested: str) -> list[Step]:
        """What one model string expands to: one step per replica (best first) or one upstream."""
        if model in self.base_names():
            base = self._require_base()
            return self._on_replicas(base, None, lambda m: BaseOnReplica(m, base))
        if model.startswith(RAG_PREFIX):
            collection = model[len(RAG_PREFIX) :]
            self._require_collection(collection)
            base = self._require_base()
            return self._on_replicas(model, None, lambda m: RagOnReplica(m, collection, base))
        frontier = self.policy.frontier_for_model(model)
        if frontier is not None:
            upstream_model = frontier.upstream_model(requested if requested in frontier.models else None)
            assert upstream_model is not None  # the policy checked every frontier has one
            return [OnFrontier(self.frontiers[frontier.name], upstream_model)]
        try:
            version = catalog.resolve(model)
        except ModelNotFound as exc:
            names = ", ".join(self.base_names())
            raise ModelNotFound(f"{exc.message} (the base model answers to {names})", param="model") from None
        steps: list[Step] = []
        merged = self._merged.healthy(version.lora_name) if self._merged is not None else None
        if merged is not None:
            steps.append(MergedDeployment(merged[0], version, merged[1]))
        steps += self._on_replicas(version.lora_name, version.lora_name, lambda m: AdapterOnReplica(m, version))
        return steps

    def _on_replicas(self, label: str, lora_name: str | None, make: Callable[[Member], Target]) -> list[Step]:
        members = self.pool.place(lora_name)
        if members:
            return [make(m) for m in members]
        reason = self.pool.why_empty()
        error = Unavailable(
            "every vLLM replica is down" if reason == "no_healthy_replica" else "every vLLM replica is overloaded",
            retry_after=2.0,
            code="upstream_unavailable" if reason == "no_healthy_replica" else "overloaded",
        )
        return [Skipped(label, reason, error)]

    def _require_base(self) -> str:
        base = self.base_model
        if base is None:
            raise Unavailable(
                "no vLLM replica has answered yet, so the base model is not known",
                retry_after=2.0,
                code="upstream_unavailable",
            )
        return base

    def _require_collection(self, collection: str) -> None:
        if self._collections is None or not self._collections.has(collection):
            have = ", ".join(self._collections.names()) if self._collections is not None else ""
            raise ModelNotFound(
                f"model '{RAG_PREFIX}{collection}' does not exist: no RAG collection {collection!r} "
                f"(collections: {have or 'none; add one with quiver rag ingest'})",
                param="model",
            )
