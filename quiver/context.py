"""What the commands share: the consoles they print to, the settings of what ``quiver up`` serves, the registry
and database they open, and the one way a command fails on a ``QuiverError``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from core.errors import QuiverError

if TYPE_CHECKING:
    from adapters import Registry
    from adapters.db import Database
    from gateway.settings import Settings

console = Console(width=140) if not Console().is_terminal else Console()
err = Console(stderr=True)


def served_settings() -> Settings:
    """``QUIVER_*`` settings, with what the last ``quiver up`` served filling in the base model and rank left unset."""
    from gateway.settings import Settings
    from quiver.up import read_served

    settings = Settings()
    served = read_served(settings.data_dir)
    update: dict[str, Any] = {}
    if settings.base_model_path is None and served.get("base_model_path"):
        update["base_model_path"] = Path(served["base_model_path"])
    if settings.base_model is None and served.get("base_model"):
        update["base_model"] = served["base_model"]
    if "max_lora_rank" not in settings.model_fields_set and served.get("max_lora_rank"):
        update["max_lora_rank"] = int(served["max_lora_rank"])
    return settings.model_copy(update=update)


def served_base_model(settings: Settings) -> tuple[Path | None, str | None]:
    """The base model's directory and served name: what ``quiver up`` serves, else the embedded model if prepared."""
    from core import embedded

    base_dir, base_name = settings.base_model_path, settings.base_model
    if base_dir is None and (embedded.model_dir() / "config.json").is_file():
        base_dir, base_name = embedded.model_dir(), base_name or embedded.SERVED_NAME
    return base_dir, base_name


def open_registry() -> Registry:
    """The registry from ``QUIVER_*`` settings, validating pushes against what ``quiver up`` serves."""
    from adapters import BaseModelSpec
    from gateway import stores

    settings = served_settings()
    base_dir, base_name = served_base_model(settings)
    base = BaseModelSpec.from_model_dir(base_dir, base_name) if base_dir else None
    return stores.open_registry(settings, base)


def open_database() -> Database:
    """The registry's database alone (``QUIVER_DATABASE_URL``), for keys, tenants and usage."""
    from gateway import stores
    from gateway.settings import Settings

    return stores.open_database(Settings())


def needs(what: str, *extras: str) -> None:
    """Exit naming the extras to install when this install lacks any of them (``vllm``: either vLLM build);
    ``what`` (the command) needs them."""
    from core import extras as installed

    try:
        installed.require(what, *(e for e in extras if e != "vllm"))
        if "vllm" in extras:
            installed.require_vllm(what)
    except QuiverError as exc:
        fail(exc)


def fail(exc: QuiverError) -> NoReturn:
    """Print the error as the commands do and exit with status 1."""
    err.print(f"[red]error[/] ({exc.code}): {escape(exc.message)}")  # a message's [brackets] are not markup
    raise typer.Exit(1)
