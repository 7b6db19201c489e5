"""``quiver adapters``: push, list, alias, route and delete adapter versions in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from core.errors import InvalidRequest, QuiverError
from quiver.context import console, err, fail, open_registry

adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry.")


@adapters_app.command("push")
def adapters_push(
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=True, help="PEFT adapter directory or archive.")],
    name: Annotated[str, typer.Option(help="Adapter name.")],
    tenant: Annotated[
        str | None, typer.Option(help="The tenant a new adapter belongs to; default: shared with every tenant.")
    ] = None,
) -> None:
    """Validate and register a new version of an adapter."""
    registry = open_registry()
    try:
        with err.status(f"Validating and storing {directory}"):
            if directory.is_dir():
                result = registry.push_dir(name, directory, tenant=tenant)
            else:
                result = registry.push_archive(name, directory, tenant=tenant)
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    v = result.version
    state = "created" if result.created else "already registered as"
    console.print(f"{state} [bold]{v.lora_name}[/] (rank {v.rank}, sha256 {v.sha256[:12]})")


@adapters_app.command("list")
def adapters_list() -> None:
    """List adapters, versions and aliases."""
    registry = open_registry()
    try:
        adapters = registry.adapters()
    finally:
        registry.close()
    table = Table("adapter", "version", "rank", "sha256", "aliases", "created")
    for adapter in adapters:
        for v in adapter.versions:
            aliases = ", ".join(sorted(a for a, n in adapter.aliases.items() if n == v.number))
            table.add_row(
                adapter.name, f"v{v.number}", str(v.rank), v.sha256[:12], aliases, f"{v.created_at:%Y-%m-%d %H:%M}"
            )
    console.print(table)


@adapters_app.command("alias")
def adapters_alias(
    name: str,
    alias: str,
    version: int,
    force: Annotated[bool, typer.Option(help="Promote to prod without a passing eval report.")] = False,
) -> None:
    """Point NAME@ALIAS at a version (e.g. `quiver adapters alias support prod 3`).

    `prod` takes only a version whose `quiver eval` report beats the best baseline by the promotion margin.
    """
    registry = open_registry()
    try:
        registry.set_alias(name, alias, version, force=force)
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    console.print(f"{name}@{alias} -> {name}@v{version}")


@adapters_app.command("set")
def adapters_set(
    name: str,
    description: Annotated[
        str | None, typer.Option(help='What the adapter does; model="auto" matches prompts to it.')
    ] = None,
    example: Annotated[
        list[str] | None, typer.Option(help='An example prompt for model="auto" (repeat; replaces the list).')
    ] = None,
    fallback: Annotated[
        list[str] | None,
        typer.Option(help="A fallback target, in order (repeat): rag:COLLECTION, frontier:NAME, an adapter, base."),
    ] = None,
    default_fallback: Annotated[
        bool, typer.Option("--default-fallback", help="Use the gateway's default fallback chain.")
    ] = False,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Never fall back from this adapter.")] = False,
) -> None:
    """Set how the gateway routes to NAME: its description and examples (for `auto`) and its fallback chain."""
    if sum((bool(fallback), default_fallback, no_fallback)) > 1:
        fail(InvalidRequest("give at most one of --fallback, --default-fallback and --no-fallback"))
    given: dict[str, Any] = {}
    if description is not None:
        given["description"] = description
    if example:
        given["examples"] = example
    if fallback or default_fallback or no_fallback:
        given["fallback"] = list(fallback or []) if not default_fallback else None
    if not given:
        fail(InvalidRequest("nothing to set: give --description, --example or a fallback option"))
    registry = open_registry()
    try:
        routing = registry.set_routing(name, **given).routing
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    chain = "the gateway's default" if routing.fallback is None else (", ".join(routing.fallback) or "none")
    console.print(f"{name}: {len(routing.examples)} example prompt(s); fallback: {chain}")
    if routing.description:
        console.print(f"description: {routing.description}")


@adapters_app.command("rm")
def adapters_rm(name: str, version: Annotated[int, typer.Option(help="Version number to delete.")]) -> None:
    """Delete one version (refused while an alias points at it)."""
    registry = open_registry()
    try:
        registry.delete_version(name, version)
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    console.print(f"deleted {name}@v{version}")
