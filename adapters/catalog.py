"""The registry's domain types and the one place model strings are resolved to adapter versions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from core.errors import InvalidRequest, ModelNotFound

# ``name@v3`` names a version; every other ``name@x`` an alias (aliases never look like this).
VERSION_REF = re.compile(r"v[0-9]+")
# What a merged model directory carries beside its weights: the merge report, and the mark that Quiver made it.
MERGE_FILE = "quiver_merge.json"


def lora_name(name: str, number: int) -> str:
    """The name vLLM knows version ``number`` of adapter ``name`` by: ``name@vN``."""
    return f"{name}@v{number}"


def parse_lora_name(model: str) -> tuple[str, int]:
    """``name@vN`` as (name, N); InvalidRequest for anything else (an alias, a bare name)."""
    name, _, ref = model.partition("@")
    if not name or not VERSION_REF.fullmatch(ref):
        raise InvalidRequest(f"'{model}' does not name a version; use NAME@vN, e.g. bot@v3", param="model")
    return name, int(ref[1:])


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable upload of an adapter; ``path`` is its directory in the store, never rewritten."""

    name: str
    number: int
    sha256: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: datetime
    # What training recorded (quiver_manifest.json), when the adapter came with one.
    manifest: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    # The newest eval report (``quiver eval``), which the promotion gate reads.
    evaluation: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def lora_name(self) -> str:
        """The name vLLM knows this version by: ``name@vN``."""
        return lora_name(self.name, self.number)


@dataclass(frozen=True)
class Merge:
    """A merged model of version ``number`` (``quiver merge``) at ``path``, with its equivalence report."""

    name: str
    number: int
    path: Path
    report: Mapping[str, Any] = field(compare=False, hash=False, repr=False)
    created_at: datetime

    @property
    def lora_name(self) -> str:
        """The version merged: ``name@vN``."""
        return lora_name(self.name, self.number)

    @property
    def equivalent(self) -> bool:
        """Whether the check found the merged model equivalent to base + adapter."""
        return self.report.get("equivalent") is True


@dataclass(frozen=True)
class Deployment:
    """Version ``number`` served by a dedicated server at ``url`` under the model name ``served_model``.

    ``pid`` is the server's process when ``quiver deploy merged`` started it; None when registered by URL.
    """

    name: str
    number: int
    url: str
    served_model: str
    pid: int | None
    created_at: datetime

    @property
    def lora_name(self) -> str:
        """The version deployed: ``name@vN``, the key of ``Catalog.deployments``."""
        return lora_name(self.name, self.number)


@dataclass(frozen=True)
class AdapterRouting:
    """How the gateway routes to an adapter (``quiver adapters set``)."""

    # What ``model="auto"`` compares prompts with.
    description: str | None = None
    examples: tuple[str, ...] = ()
    # Targets tried, in order, when the adapter cannot answer; None means the gateway's default chain.
    fallback: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Adapter:
    """A named adapter: its versions (ascending by number) and aliases (alias -> version number)."""

    name: str
    versions: tuple[AdapterVersion, ...]
    aliases: Mapping[str, int]
    created_at: datetime
    routing: AdapterRouting = AdapterRouting()
    # The tenant whose keys see it; None: shared with every tenant.
    tenant: str | None = None

    @property
    def latest(self) -> AdapterVersion:
        """The highest-numbered version."""
        return self.versions[-1]

    @property
    def default(self) -> AdapterVersion:
        """What the bare name means: the ``prod`` alias if set, else the latest version."""
        number = self.aliases.get("prod")
        return self.version(number) if number is not None else self.latest

    def version(self, number: int) -> AdapterVersion:
        """Version ``number``; ModelNotFound naming the versions that exist."""
        for v in self.versions:
            if v.number == number:
                return v
        raise ModelNotFound(
            f"model '{self.name}@v{number}' does not exist; {self.name} has versions {self._numbers()}",
            param="model",
        )

    def _numbers(self) -> str:
        return ", ".join(f"v{v.number}" for v in self.versions)


class Catalog:
    """An immutable snapshot of the registry that resolves ``name``, ``name@vN`` and ``name@alias``.

    ``revision`` is the registry revision the snapshot was read at; compare it with
    ``Registry.revision()`` to know when to take a new one.
    """

    def __init__(self, adapters: Iterable[Adapter], revision: int = 0, deployments: Iterable[Deployment] = ()) -> None:
        self.revision = revision
        self._deployments: Mapping[str, Deployment] = MappingProxyType({d.lora_name: d for d in deployments})
        self._adapters: Mapping[str, Adapter] = MappingProxyType({a.name: a for a in adapters})
        ids: dict[str, AdapterVersion] = {}
        for adapter in self._adapters.values():
            ids[adapter.name] = adapter.default
            for v in adapter.versions:
                ids[v.lora_name] = v
            for alias, number in sorted(adapter.aliases.items()):
                ids[f"{adapter.name}@{alias}"] = adapter.version(number)
        self._ids: Mapping[str, AdapterVersion] = MappingProxyType(ids)
        self._views: dict[str, Catalog] = {}

    @property
    def adapters(self) -> Mapping[str, Adapter]:
        """Every adapter by name."""
        return self._adapters

    @property
    def deployments(self) -> Mapping[str, Deployment]:
        """Versions served by a dedicated server of their own, by ``name@vN``."""
        return self._deployments

    @staticmethod
    def adapter_name(model: str) -> str:
        """The adapter a model string is about: ``bot`` for ``bot``, ``bot@v2`` and ``bot@prod``."""
        return model.partition("@")[0]

    def resolve(self, model: str) -> AdapterVersion:
        """The version ``model`` names; ModelNotFound says what exists instead."""
        found = self._ids.get(model)
        if found is not None:
            return found
        name, _, ref = model.partition("@")
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ModelNotFound(f"model '{model}' does not exist", param="model")
        if VERSION_REF.fullmatch(ref):
            adapter.version(int(ref[1:]))  # raises, naming the versions that exist
        aliases = ", ".join(sorted(adapter.aliases)) or "none"
        raise ModelNotFound(
            f"model '{model}' does not exist; {name} has versions {adapter._numbers()} and aliases {aliases}",
            param="model",
        )

    def visible_to(self, tenant: str | None) -> Catalog:
        """What ``tenant``'s keys see: its own adapters and the shared ones; None sees everything.

        Built once per snapshot and tenant; the snapshot is immutable, so the view never goes stale.
        """
        if tenant is None:
            return self
        view = self._views.get(tenant)
        if view is None:
            adapters = [a for a in self._adapters.values() if a.tenant in (None, tenant)]
            names = {a.name for a in adapters}
            deployments = [d for d in self._deployments.values() if d.name in names]
            view = self._views[tenant] = Catalog(adapters, self.revision, deployments)
        return view

    def model_ids(self) -> Mapping[str, AdapterVersion]:
        """Every model string that resolves (``name``, ``name@vN``, ``name@alias``) and its version."""
        return self._ids
