"""The ``quiver`` command line: one typer app with a subcommand group per package."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from core.errors import InvalidRequest, QuiverError
from quiver import access

if TYPE_CHECKING:
    from adapters import Registry
    from adapters.merge import MergeReport
    from gateway.rag import VectorIndex
    from gateway.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Serve many LoRA adapters over one base model.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded base model.")
rag_app = typer.Typer(no_args_is_help=True, help="RAG collections: ingest documents, query them.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(model_app, name="model")
app.add_typer(rag_app, name="rag")
deploy_app = typer.Typer(no_args_is_help=True, help="Versions served by a merged model of their own.")
app.add_typer(deploy_app, name="deploy")
app.add_typer(access.keys_app, name="keys")
app.add_typer(access.tenants_app, name="tenants")
app.command("usage")(access.usage)

console = Console(width=140) if not Console().is_terminal else Console()
err = Console(stderr=True)


@app.command()
def up(
    model: Annotated[
        str | None,
        typer.Option(
            envvar="QUIVER_MODEL", help="Base model directory or hub name (default: embedded SmolLM2-135M-Instruct)."
        ),
    ] = None,
    vllm_url: Annotated[
        str | None, typer.Option(envvar="QUIVER_VLLM_URL", help="Use an already running vLLM instead of starting one.")
    ] = None,
    host: Annotated[str, typer.Option(envvar="QUIVER_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="QUIVER_PORT")] = 8000,
    vllm_port: Annotated[int, typer.Option(envvar="QUIVER_VLLM_PORT")] = 8001,
    max_loras: Annotated[int, typer.Option(envvar="QUIVER_MAX_LORAS")] = 4,
    max_lora_rank: Annotated[int, typer.Option(envvar="QUIVER_MAX_LORA_RANK")] = 16,
) -> None:
    """Start vLLM and the gateway; Ctrl-C stops both."""
    from quiver import up as up_module

    code = up_module.run(
        model=model,
        vllm_url=vllm_url,
        host=host,
        port=port,
        vllm_port=vllm_port,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        console=console,
    )
    raise typer.Exit(code)


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the embedded model once (cached) and print its directory."""
    from core import embedded

    print(embedded.prepare(console=err))


def _served_settings() -> Settings:
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


def _base_model(settings: Settings) -> tuple[Path | None, str | None]:
    """The base model's directory and served name: what ``quiver up`` serves, else the embedded model if prepared."""
    from core import embedded

    base_dir, base_name = settings.base_model_path, settings.base_model
    if base_dir is None and (embedded.model_dir() / "config.json").is_file():
        base_dir, base_name = embedded.model_dir(), base_name or embedded.SERVED_NAME
    return base_dir, base_name


def _registry() -> Registry:
    """The registry from ``QUIVER_*`` settings, validating pushes against what ``quiver up`` serves."""
    from adapters import BaseModelSpec
    from gateway.app import open_registry

    settings = _served_settings()
    base_dir, base_name = _base_model(settings)
    base = BaseModelSpec.from_model_dir(base_dir, base_name) if base_dir else None
    return open_registry(settings, base)


def _fail(exc: QuiverError) -> NoReturn:
    err.print(f"[red]error[/] ({exc.code}): {exc.message}")
    raise typer.Exit(1)


@adapters_app.command("push")
def adapters_push(
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=True, help="PEFT adapter directory or archive.")],
    name: Annotated[str, typer.Option(help="Adapter name.")],
    tenant: Annotated[
        str | None, typer.Option(help="The tenant a new adapter belongs to; default: shared with every tenant.")
    ] = None,
) -> None:
    """Validate and register a new version of an adapter."""
    registry = _registry()
    try:
        with err.status(f"Validating and storing {directory}"):
            if directory.is_dir():
                result = registry.push_dir(name, directory, tenant=tenant)
            else:
                result = registry.push_archive(name, directory, tenant=tenant)
    except QuiverError as exc:
        _fail(exc)
    finally:
        registry.close()
    v = result.version
    state = "created" if result.created else "already registered as"
    console.print(f"{state} [bold]{v.lora_name}[/] (rank {v.rank}, sha256 {v.sha256[:12]})")


@adapters_app.command("list")
def adapters_list() -> None:
    """List adapters, versions and aliases."""
    registry = _registry()
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
    registry = _registry()
    try:
        registry.set_alias(name, alias, version, force=force)
    except QuiverError as exc:
        _fail(exc)
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
        _fail(InvalidRequest("give at most one of --fallback, --default-fallback and --no-fallback"))
    given: dict[str, Any] = {}
    if description is not None:
        given["description"] = description
    if example:
        given["examples"] = example
    if fallback or default_fallback or no_fallback:
        given["fallback"] = list(fallback or []) if not default_fallback else None
    if not given:
        _fail(InvalidRequest("nothing to set: give --description, --example or a fallback option"))
    registry = _registry()
    try:
        routing = registry.set_routing(name, **given).routing
    except QuiverError as exc:
        _fail(exc)
    finally:
        registry.close()
    chain = "the gateway's default" if routing.fallback is None else (", ".join(routing.fallback) or "none")
    console.print(f"{name}: {len(routing.examples)} example prompt(s); fallback: {chain}")
    if routing.description:
        console.print(f"description: {routing.description}")


@adapters_app.command("rm")
def adapters_rm(name: str, version: Annotated[int, typer.Option(help="Version number to delete.")]) -> None:
    """Delete one version (refused while an alias points at it)."""
    registry = _registry()
    try:
        registry.delete_version(name, version)
    except QuiverError as exc:
        _fail(exc)
    finally:
        registry.close()
    console.print(f"deleted {name}@v{version}")


def _rag_index() -> VectorIndex:
    """The RAG index ``QUIVER_RAG_URL`` names (default: the embedded one in the data dir)."""
    from gateway.rag import index_url, open_index
    from gateway.settings import Settings

    return open_index(index_url(Settings()))


# An ingest of fewer chunks than this is over before a progress bar would tell anything.
_PROGRESS_BAR_CHUNKS = 64


@rag_app.command("ingest")
def rag_ingest(
    collection: Annotated[str, typer.Argument(help="Collection to add to (created if new).")],
    files: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Text, markdown (.md) or JSONL (.jsonl) files.")
    ],
    chunk_tokens: Annotated[int, typer.Option(help="Chunk size in embedding-model tokens (at most 254).")] = 200,
    overlap: Annotated[
        int | None, typer.Option(help="Tokens each chunk repeats from the one before (default a fifth, at most half).")
    ] = None,
) -> None:
    """Chunk, embed and store files; a file ingested before is replaced, or skipped if unchanged.

    JSONL: one JSON object a line with a "text" field; its other fields are kept as the chunks' metadata.
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from core.embeddings import Embedder
    from gateway.rag import ChunkingConfig, ingest

    bar = Progress(
        TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True
    )
    task = bar.add_task("chunks", total=None)

    def progress(done: int, total: int) -> None:
        if total >= _PROGRESS_BAR_CHUNKS and not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    index = _rag_index()
    try:
        config = ChunkingConfig(chunk_tokens, overlap)
        with err.status("Loading the embedding model"):
            embedder = Embedder()
        started = time.perf_counter()
        try:
            results = ingest(index, embedder, collection, files, config, progress)
        finally:
            bar.stop()
        elapsed = time.perf_counter() - started
    except QuiverError as exc:
        _fail(exc)
    finally:
        index.close()
    written = sum(r.chunks for r in results)
    for r in results:
        console.print(f"{r.name}: " + ("unchanged" if r.unchanged else f"{r.chunks} chunks"))
    rate = f" ({written / elapsed:.0f} chunks/s)" if written and elapsed > 0 else ""
    console.print(f"'{collection}': {written} chunks written from {len(results)} files in {elapsed:.1f} s{rate}")


@rag_app.command("list")
def rag_list() -> None:
    """List collections with their source and chunk counts."""
    index = _rag_index()
    try:
        collections = index.collections()
    finally:
        index.close()
    table = Table("collection", "sources", "chunks", "model")
    for c in collections:
        table.add_row(c.name, str(c.sources), str(c.chunks), c.model)
    console.print(table)


@rag_app.command("query")
def rag_query(
    collection: str,
    text: Annotated[str, typer.Argument(help="The question to find sources for.")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many sources to show.")] = 4,
) -> None:
    """Show the chunks the RAG path would retrieve for TEXT, best first, with scores and sources."""
    from core.embeddings import Embedder
    from gateway.rag import RagPath

    index = _rag_index()
    try:
        with err.status("Loading the embedding model"):
            rag = RagPath(index, Embedder())
        sources = rag.retrieve(collection, text, k)
    except QuiverError as exc:
        _fail(exc)
    finally:
        index.close()
    for n, source in enumerate(sources, 1):
        console.print(f"[bold][{n}][/] {source.score:.3f}  {source.source} ({source.location})", highlight=False)
        console.print(source.text, markup=False, highlight=False)
        console.print()


@rag_app.command("rm")
def rag_rm(collection: str) -> None:
    """Delete a collection and all its chunks."""
    index = _rag_index()
    try:
        index.drop(collection)
    except QuiverError as exc:
        _fail(exc)
    finally:
        index.close()
    console.print(f"deleted collection '{collection}'")


class Precision(StrEnum):
    """The precision `quiver merge` saves the merged model in."""

    bfloat16 = "bfloat16"
    float32 = "float32"


@app.command()
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
    import torch

    from adapters import DeploymentStore
    from adapters.merge import merge_version

    settings = _served_settings()
    base_dir, _ = _base_model(settings)
    if base_dir is None:
        err.print("[red]error[/]: no base model; set QUIVER_BASE_MODEL_PATH or run `quiver model prepare`")
        raise typer.Exit(1)
    lines = prompts.read_text(encoding="utf-8").splitlines() if prompts else []
    registry = _registry()
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
        _fail(exc)
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
    from core.vllm_server import free_port
    from quiver import deploy

    settings = _served_settings()
    registry = _registry()
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
        _fail(exc)
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

    registry = _registry()
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

    registry = _registry()
    try:
        name, number = parse_lora_name(model)
        with err.status(f"Removing the deployment of {model}"):
            deployment, stopped = deploy.remove(DeploymentStore.beside(registry), name, number)
    except QuiverError as exc:
        _fail(exc)
    finally:
        registry.close()
    note = f"; stopped vLLM (pid {deployment.pid})" if stopped else ""
    if deployment.pid and not stopped:
        note = f"; pid {deployment.pid} is no longer its vLLM, nothing stopped"
    console.print(f"removed the deployment of {deployment.lora_name} at {deployment.url}{note}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training data file.")],
    name: Annotated[str, typer.Option(help="Adapter name (and the run's directory name).")],
    val: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Validation file.")] = None,
    test: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Test file (leak check).")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model directory (default: the embedded model).")] = None,
    method: Annotated[str, typer.Option(help="sft or dpo.")] = "sft",
    peft: Annotated[str, typer.Option(help="lora or qlora (4-bit NF4 base).")] = "lora",
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Annotated[str, typer.Option(help="all-linear or a comma-separated list.")] = "all-linear",
    epochs: float = 3.0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 2e-4 SFT, 5e-6 DPO).")] = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    seed: int = 0,
    packing: bool = False,
    early_stopping_patience: Annotated[int | None, typer.Option(help="Evaluations without improvement.")] = None,
    gradient_checkpointing: bool = False,
    output: Annotated[Path, typer.Option(help="Runs directory; the run goes to OUTPUT/NAME.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue from the run's latest checkpoint.")] = False,
    push: Annotated[bool, typer.Option(help="Register the adapter as a new version of NAME.")] = False,
) -> None:
    """Train a LoRA/QLoRA adapter with TRL + PEFT (SFT or DPO) and optionally push it."""
    from core import embedded
    from training.config import TrainConfig
    from training.train import train as run_training

    served = _served_settings()
    # Train against the base `quiver up` serves (or the embedded one), so the adapter fits it.
    base_dir = base or served.base_model_path or embedded.prepare(console=err)
    modules: str | tuple[str, ...] = (
        target_modules if target_modules == "all-linear" else tuple(m.strip() for m in target_modules.split(","))
    )
    try:
        config = TrainConfig(
            base_model=base_dir,
            output_dir=output / name,
            method=method,
            peft=peft,  # type: ignore[arg-type]
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=modules,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seed=seed,
            packing=packing,
            early_stopping_patience=early_stopping_patience,
            gradient_checkpointing=gradient_checkpointing,
            max_lora_rank=served.max_lora_rank,
        )
        result = run_training(config, data, val=val, test=test, resume=resume, console=err)
    except QuiverError as exc:
        _fail(exc)
    console.print(f"adapter written to [bold]{result.adapter_dir}[/] ({result.global_step} steps)")
    if push:
        adapters_push(result.adapter_dir, name)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="The adapter version to evaluate: NAME@vN (or NAME@alias).")],
    test: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Held-out test file (chat JSONL).")],
    train: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training data: few-shot and RAG pool.")],
    spec: Annotated[
        Path | None, typer.Option(dir_okay=False, help="dataset_spec.json (default: beside the test file).")
    ] = None,
    k: Annotated[int, typer.Option(help="Examples the few-shot and RAG baselines show.")] = 3,
    gateway: Annotated[str | None, typer.Option(help="Gateway URL (default: the one `quiver up` serves).")] = None,
    probe: Annotated[bool, typer.Option(help="Run the general-knowledge forgetting probe.")] = True,
    probe_questions: Annotated[
        int | None, typer.Option(min=1, help="Ask only the probe's first N questions (default: all 60).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest answer per request, in tokens.")] = 128,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    store: Annotated[bool, typer.Option(help="Store the report with the version in the registry.")] = True,
    output: Annotated[Path | None, typer.Option(dir_okay=False, help="Also write the JSON report here.")] = None,
) -> None:
    """Score an adapter and three baselines (base + prompt, few-shot, RAG) on a test set, through the gateway."""
    from training.eval import TaskSpec, evaluate, report_table

    settings = _served_settings()
    spec_path = spec or test.parent / "dataset_spec.json"
    registry = _registry()
    try:
        version = registry.resolve(model)
        task = TaskSpec.from_file(spec_path) if spec_path.is_file() else TaskSpec()
        url = gateway or f"http://{settings.host}:{settings.port}"
        report = evaluate(
            version.lora_name, test, train, base_url=url, spec=task, k=k,
            probe=(probe_questions or True) if probe else False, max_tokens=max_tokens, concurrency=concurrency,
            console=err,
        )  # fmt: skip
        if store:
            registry.record_evaluation(version.name, version.number, report)
    except QuiverError as exc:
        _fail(exc)
    finally:
        registry.close()
    console.print(report_table(report, registry.promotion_margin))
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if store:
        console.print(f"report stored with {version.lora_name}")


@app.command()
def loadtest(
    scenario: Annotated[
        str, typer.Option(help="base, adapter, churn, streaming, hotswap or mixed (see the README).")
    ] = "base",
    users: Annotated[int, typer.Option(min=1, help="Concurrent users.")] = 4,
    spawn_rate: Annotated[float, typer.Option(min=0.01, help="Users started per second.")] = 2.0,
    duration: Annotated[str, typer.Option(help="How long to run: 90, 45s, 10m, 1h30m.")] = "60s",
    host: Annotated[str | None, typer.Option(help="Target URL (default: the gateway `quiver up` serves).")] = None,
    web: Annotated[bool, typer.Option(help="Run locust's web UI instead of a headless run.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Results directory (default: loadtest/results/SCENARIO-TIMESTAMP).")
    ] = None,
    push_dir: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="hotswap: an adapter directory to push new versions of."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 16,
    rag: Annotated[
        list[str] | None,
        typer.Option(help="mixed: use this RAG collection (repeatable; default: every rag:C the target lists)."),
    ] = None,
    sample_every: Annotated[
        float, typer.Option(min=0.5, help="Seconds between samples of the target's /metrics (RSS, counters).")
    ] = 5.0,
) -> None:
    """Load-test a gateway with a locust scenario; write CSV, HTML and RSS samples; exit 1 if any request failed.

    Also the soak test: `quiver loadtest --scenario churn --duration 10m` reports the gateway's memory growth.
    """
    from datetime import datetime

    from loadtest import runner
    from loadtest.scenarios import Options

    if host is None:
        settings = _served_settings()
        host = f"http://{settings.host}:{settings.port}"
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    try:
        test = runner.LoadTest(
            scenario=scenario, host=host.rstrip("/"), users=users, spawn_rate=spawn_rate,
            duration_s=runner.parse_duration(duration),
            out=out or Path("loadtest/results") / f"{scenario}-{stamp}", web=web,
            options=Options(max_tokens, push_dir.resolve() if push_dir else None, tuple(rag or ())),
            sample_every_s=sample_every,
        )  # fmt: skip
        code = runner.run(test, console, err)
    except QuiverError as exc:
        _fail(exc)
    raise typer.Exit(code)


class Benchmark(StrEnum):
    """The sections of `quiver bench`, each of which `--only` runs alone."""

    gateway = "gateway"
    serving = "serving"
    naive = "naive"
    merged = "merged"
    registry = "registry"
    training = "training"
    routing = "routing"


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Runs directory for the data and the adapter.")] = Path("runs"),
) -> None:
    """Train the demo adapter (support triage) on this machine, evaluate it against the baselines, push it."""
    from core import embedded
    from quiver import demo as demo_module

    settings = _served_settings()
    base_dir = settings.base_model_path or embedded.prepare(console=err)
    if settings.base_model is None:
        settings = settings.model_copy(update={"base_model": embedded.SERVED_NAME})
    try:
        demo_module.run(settings, base_dir, output, err)
    except QuiverError as exc:
        _fail(exc)


@app.command()
def bench(
    only: Annotated[list[Benchmark] | None, typer.Option(help="Run these sections only (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("bench/results"),
    gpu: Annotated[bool, typer.Option(help="Run on CUDA with --base-model and a bigger workload.")] = False,
    base_model: Annotated[
        Path | None, typer.Option(help="Base model directory (default: the embedded model; required with --gpu).")
    ] = None,
    vllm_url: Annotated[
        str | None, typer.Option(help="--only gateway: benchmark against this vLLM instead of starting one.")
    ] = None,
    training_steps: Annotated[int, typer.Option(help="Timed optimizer steps per training run.")] = 3,
    training_rounds: Annotated[int, typer.Option(help="Alternating rounds of the training comparison.")] = 2,
) -> None:
    """Every serving comparison side by side in one run: gateway vs vLLM direct, adapters vs base, churn, cold
    start, naive transformers + PEFT, merged vs unmerged, registry scale, gateway memory. `--only training` and
    `--only routing` (affinity vs round-robin over two replicas) add the training and placement comparisons."""
    from core import embedded
    from loadtest import suite

    # The default run is the serving suite (under 15 minutes on a 2-core CPU); training and placement start
    # processes of their own and run when named.
    chosen = set(only or set(Benchmark) - {Benchmark.training, Benchmark.routing})
    if vllm_url is not None and chosen != {Benchmark.gateway}:
        _fail(InvalidRequest("--vllm-url goes with --only gateway (the other sections start their own vLLM)"))
    if gpu and base_model is None:
        _fail(InvalidRequest("--gpu needs --base-model: a model directory to serve on CUDA", param="base_model"))
    if gpu and not _cuda():
        _fail(InvalidRequest("--gpu: CUDA is not available on this machine", param="gpu"))
    base = base_model or embedded.prepare(console=err)
    profile = suite.GPU_PROFILE if gpu else suite.Profile()
    if chosen == {Benchmark.gateway} and vllm_url is not None:
        from loadtest import bench as gateway_bench

        gateway_bench.run(vllm_url, rounds=6, requests=120, out_dir=out, console=console)
    elif served := [s for s in suite.SECTIONS if s in chosen]:
        suite.run(base, out, console, profile=profile, sections=served, gpu=gpu)
    if Benchmark.registry in chosen:
        from loadtest import registry_scale

        with suite.took(console, "registry scale"):
            registry_scale.run(base, out, console)
    if Benchmark.training in chosen:
        from training import bench as training_bench

        with suite.took(console, "training"):
            training_bench.run(base, out, console, steps=training_steps, rounds=training_rounds)
    if Benchmark.routing in chosen:
        with suite.took(console, "affinity vs round-robin"):
            _bench_placement(base, out, profile)


def _bench_placement(base: Path, out: Path, profile: Any) -> None:
    import tempfile

    from loadtest import fixtures, routing

    with tempfile.TemporaryDirectory(prefix="quiver-bench-adapters-") as tmp:
        adapters = fixtures.make_adapters(base, Path(tmp), 6, profile.rank, err)
        routing.run_placement(base, adapters, out, console)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
