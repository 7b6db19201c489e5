"""Opening the registry and the stores beside it the way these settings describe; the gateway and the CLI share it."""

from __future__ import annotations

from adapters import BaseModelSpec, Registry
from adapters.db import Database
from gateway.router import AUTO, BASE_ALIAS
from gateway.settings import Settings


def open_registry(settings: Settings, base: BaseModelSpec | None) -> Registry:
    """The registry these settings describe, checking pushes against ``base`` when it is known."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite database is in it
    reserved = {BASE_ALIAS, AUTO} | ({settings.base_model} if settings.base_model else set())
    return Registry.open(
        settings.registry_url,
        settings.adapter_store,
        base=base,
        max_lora_rank=settings.max_lora_rank,
        reserved_names=frozenset(reserved),
        promotion_margin=settings.promotion_margin,
    )


def open_database(settings: Settings) -> Database:
    """The registry's database alone, for the stores that need no adapter store (keys, tenants, usage)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite database is in it
    return Database.open(settings.registry_url)
