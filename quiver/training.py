"""``quiver train``, ``quiver eval`` and ``quiver demo``: fine-tune an adapter, score it against the baselines, and
the demo that does both (``quiver/demo.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from core.errors import QuiverError
from quiver.adapters import adapters_push
from quiver.context import console, err, fail, needs, open_registry, served_settings

if TYPE_CHECKING:
    from training.config import Method, PeftMethod


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
    needs("quiver train", "ml", "training")
    from core import embedded
    from training.config import TrainConfig
    from training.train import train as run_training

    served = served_settings()
    # Train against the base `quiver up` serves (or the embedded one), so the adapter fits it.
    base_dir = base or served.base_model_path or embedded.prepare(console=err)
    modules: str | tuple[str, ...] = (
        target_modules if target_modules == "all-linear" else tuple(m.strip() for m in target_modules.split(","))
    )
    try:
        config = TrainConfig(
            base_model=base_dir,
            output_dir=output / name,
            # Options are plain text; TrainConfig refuses any other value, naming the option.
            method=cast("Method", method),
            peft=cast("PeftMethod", peft),
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
        fail(exc)
    console.print(f"adapter written to [bold]{result.adapter_dir}[/] ({result.global_step} steps)")
    if push:
        adapters_push(result.adapter_dir, name)


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
    needs("quiver eval", "ml", "training")
    from training.eval import TaskSpec, evaluate, report_table

    settings = served_settings()
    spec_path = spec or test.parent / "dataset_spec.json"
    registry = open_registry()
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
        fail(exc)
    finally:
        registry.close()
    console.print(report_table(report, registry.promotion_margin))
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if store:
        console.print(f"report stored with {version.lora_name}")


def demo(
    output: Annotated[Path, typer.Option(help="Runs directory for the data and the adapter.")] = Path("runs"),
) -> None:
    """Train the demo adapter (support triage) on this machine, evaluate it against the baselines, push it."""
    needs("quiver demo", "ml", "training")
    from core import embedded
    from quiver import demo as demo_module

    settings = served_settings()
    base_dir = settings.base_model_path or embedded.prepare(console=err)
    if settings.base_model is None:
        settings = settings.model_copy(update={"base_model": embedded.SERVED_NAME})
    try:
        demo_module.run(settings, base_dir, output, err)
    except QuiverError as exc:
        fail(exc)
