"""From the ``model`` string of a request to a Plan: the ordered targets that may answer it.

Today a plan holds one target (the base model or an adapter on the single vLLM replica); the
serving loop already walks the list, so fallback targets slot in without touching the routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapters import AdapterVersion, Catalog
from gateway.upstream import VllmReplica
from quiver.errors import ModelNotFound, Unavailable

BASE_ALIAS = "base"


@dataclass(frozen=True)
class BaseOnReplica:
    """The shared base model itself, on a vLLM replica."""

    replica: VllmReplica
    upstream_model: str

    @property
    def served_by(self) -> str:
        return self.upstream_model


@dataclass(frozen=True)
class AdapterOnReplica:
    """One adapter version, loaded on demand into a vLLM replica."""

    replica: VllmReplica
    version: AdapterVersion

    @property
    def upstream_model(self) -> str:
        return self.version.lora_name

    @property
    def served_by(self) -> str:
        return self.version.lora_name


Target = BaseOnReplica | AdapterOnReplica


@dataclass(frozen=True)
class Plan:
    """What a request asked for and the targets to try, in order."""

    model: str
    targets: tuple[Target, ...]


class Router:
    """Resolves model strings against the current registry snapshot."""

    def __init__(self, replica: VllmReplica, catalog: Callable[[], Catalog], base_model: str | None) -> None:
        self._replica = replica
        self._catalog = catalog
        self._base_model = base_model

    @property
    def base_model(self) -> str | None:
        """The base model's name: configured, else what vLLM reports."""
        return self._base_model or self._replica.served_model

    def base_names(self) -> tuple[str, ...]:
        """Every name the base model answers to."""
        return (self.base_model, BASE_ALIAS) if self.base_model else (BASE_ALIAS,)

    def plan(self, model: str) -> Plan:
        """The plan for ``model``; ModelNotFound when nothing serves it."""
        if model in self.base_names():
            base = self.base_model
            if base is None:
                raise Unavailable(
                    f"vLLM at {self._replica.url} has not answered yet, so the base model is not known",
                    retry_after=2.0,
                    code="upstream_unavailable",
                )
            return Plan(model, (BaseOnReplica(self._replica, base),))
        try:
            version = self._catalog().resolve(model)
        except ModelNotFound as exc:
            names = ", ".join(self.base_names())
            raise ModelNotFound(f"{exc.message} (the base model answers to {names})", param="model") from None
        return Plan(model, (AdapterOnReplica(self._replica, version),))
