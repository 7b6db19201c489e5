"""``quiver merge`` and ``quiver deploy``: merge an adapter version into the base model, then serve the merged model
on a vLLM of its own (``quiver/deploy.py`` starts and stops it)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from core.errors import QuiverError
from quiver.context import console, err, fail, needs, open_registry, served_base_model, served_settings

if TYPE_CHECKING:
    from adapters.merge import MergeReport

deploy_app = typer.Typer(no_args_is_help=True, help="Versions served by a merged model of their own.")


class Precision(StrEnum):
    """The precision `quiver merge` saves the merged model in."""

    bfloat16 = "bfloat16"
    float32 = "float32"


def merge(
    model: Annotated[str, typer.Argument(help="The adapter version to merge: NAME@vN (or NAME@alias).")],
    output: Annotated[
        Path | None, typer.Option(file_okay=False, help="Merged model directory (default: DATA_DIR/merged/NAME@vN).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Equivalence prompts, one user message a line.")
    ] = None,
    dtype: Annotated[Precision | None, typer.Option(help="Saved precision (default: the base model's own).")] = None,
    force: Annotated[bool, typer.Option(help="Keep and record the merge even when it is not equivalent.")] = False,
) -> None:
    """Merge an adapter version into the base model for latency, after checking they answer the same.

    The merged model is saved only when its greedy tokens match base + adapter on every prompt (logprobs
    within a tolerance); then `quiver deploy merged NAME@vN` can serve it.
    """
    needs("quiver merge", "ml")
    import torch

    from adapters import DeploymentStore
    from adapters.merge import merge_version

    settings = served_settings()
    base_dir, _ = served_base_model(settings)
    if base_dir is None:
        err.print("[red]error[/]: no base model; set QUIVER_BASE_MODEL_PATH or run `quiver model prepare`")
        raise typer.Exit(1)
    lines = prompts.read_text(encoding="utf-8").splitlines() if prompts else []
    registry = open_registry()
    try:
        version = registry.resolve(model)
        out = output or settings.data_dir / "merged" / version.lora_name
        with err.status(f"Merging {version.lora_name} into {base_dir.name} and checking equivalence"):
            report = merge_version(
                version, base_dir, out, [p for p in lines if p.strip()] or None,
                getattr(torch, dtype.value) if dtype else None, force=force,
            )  # fmt: skip
        console.print(_merge_table(report))
        if report.saved:
            DeploymentStore.beside(registry).record_merge(version.name, version.number, report.path, report.to_json())
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    if not report.saved:
        err.print("[red]not equivalent[/]: nothing saved or recorded (--force keeps it for inspection)")
        raise typer.Exit(1)
    state = "equivalent" if report.equivalent else "[red]NOT equivalent[/] (kept by --force)"
    took = report.merge_s + report.check_s
    console.print(f"merged {version.lora_name} ({state}) into [bold]{report.path}[/] in {took:.0f} s")


def _merge_table(report: MergeReport) -> Table:
    eq = report.equivalence
    verdict = "[green]equivalent[/]" if eq.equivalent else "[red]NOT equivalent[/]"
    table = Table(
        "prompt", "greedy tokens", f"max |Δ logprob| (≤ {eq.tolerance:g})",
        title=f"{report.lora_name} merged ({eq.dtype}) vs base + adapter: {verdict}",
        caption=f"{eq.new_tokens} greedy tokens a prompt, computed in fp32; check took {report.check_s:.0f} s",
    )  # fmt: skip
    for check in eq.checks:
        same = "[green]identical[/]" if check.identical else "[red]differ[/]"
        within = check.max_logprob_diff <= eq.tolerance
        table.add_row(check.prompt, same, f"[{'green' if within else 'red'}]{check.max_logprob_diff:.2g}[/]")
    return table


@deploy_app.command("merged")
def deploy_merged(
    model: Annotated[str, typer.Argument(help="The adapter version to deploy: NAME@vN (or NAME@alias).")],
    port: Annotated[int | None, typer.Option(help="Port of the dedicated vLLM (default: a free one).")] = None,
    url: Annotated[
        str | None, typer.Option(help="Register a server already running at this URL instead (e.g. on Kubernetes).")
    ] = None,
    served_model: Annotated[
        str | None, typer.Option(help="With --url: the model name that server answers to (default: NAME@vN).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for vLLM to come up.")] = 600.0,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(help="An extra vLLM flag, repeatable: --vllm-arg=--enforce-eager --vllm-arg=--max-num-seqs=64."),
    ] = None,
) -> None:
    """Serve a version from its merged model on a dedicated vLLM (LoRA off); the gateway routes it there.

    Without --url, starts vLLM in the background on this machine (log under DATA_DIR/logs); it keeps
    running after this command returns, until `quiver deploy rm NAME@vN`.
    """
    import time

    from adapters import DeploymentStore
    from core.processes import free_port
    from quiver import deploy

    if url is None:
        needs("`quiver deploy merged` without --url (it starts vLLM)", "vllm")

    settings = served_settings()
    registry = open_registry()
    started = time.monotonic()
    try:
        version = registry.resolve(model)
        deployments = DeploymentStore.beside(registry)
        if url is not None:
            deployment = deploy.register_url(deployments, version, url, served_model)
        else:
            with err.status(f"Starting vLLM for the merged {version.lora_name}") as status:
                deployment = deploy.start_merged(
                    deployments, version, port=port or free_port(), log_dir=settings.data_dir / "logs",
                    timeout_s=timeout, on_wait=lambda line: status.update(f"Starting vLLM: {line[-100:]}"),
                    extra_args=tuple(vllm_arg or ()),
                )  # fmt: skip
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    pid = f", pid {deployment.pid}" if deployment.pid else ""
    console.print(
        f"deployed [bold]{deployment.lora_name}[/] at {deployment.url} as {deployment.served_model}{pid} "
        f"in {time.monotonic() - started:.0f} s; the gateway now routes {deployment.lora_name} there"
    )


@deploy_app.command("list")
def deploy_list() -> None:
    """List deployments."""
    from adapters import DeploymentStore

    registry = open_registry()
    try:
        deployments = DeploymentStore.beside(registry).deployments()
    finally:
        registry.close()
    table = Table("model", "url", "served model", "pid", "created")
    for d in deployments:
        table.add_row(d.lora_name, d.url, d.served_model, str(d.pid or ""), f"{d.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@deploy_app.command("rm")
def deploy_rm(model: Annotated[str, typer.Argument(help="The deployed version: NAME@vN.")]) -> None:
    """Unregister a deployment (its traffic returns to the adapter), then stop its vLLM if quiver started it."""
    from adapters import DeploymentStore, parse_lora_name
    from quiver import deploy

    registry = open_registry()
    try:
        name, number = parse_lora_name(model)
        with err.status(f"Removing the deployment of {model}"):
            deployment, stopped = deploy.remove(DeploymentStore.beside(registry), name, number)
    except QuiverError as exc:
        fail(exc)
    finally:
        registry.close()
    note = f"; stopped vLLM (pid {deployment.pid})" if stopped else ""
    if deployment.pid and not stopped:
        note = f"; pid {deployment.pid} is no longer its vLLM, nothing stopped"
    console.print(f"removed the deployment of {deployment.lora_name} at {deployment.url}{note}")
