"""``quiver up`` and ``quiver model prepare``: serve the gateway over vLLM, and the embedded base model it serves
by default (``quiver/up.py`` does the serving)."""

from __future__ import annotations

from typing import Annotated

import typer

from core.errors import QuiverError
from quiver.context import console, err, fail

model_app = typer.Typer(no_args_is_help=True, help="The embedded base model.")


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
    from core import threads

    # Before numpy and tokenizers load (with the gateway, below); vLLM's process does not inherit the caps.
    threads.cap()
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
def model_prepare(
    embeddings_only: Annotated[
        bool,
        typer.Option(
            "--embeddings-only", help="Only the embeddings' ONNX export (auto, RAG), for a gateway over another base."
        ),
    ] = False,
) -> None:
    """Convert the embedded model and export the embeddings (auto, RAG) to ONNX once (cached); print the model path."""
    from core import embedded, embedding_export

    try:
        print(embedding_export.prepare(console=err) if embeddings_only else embedded.prepare(console=err))
    except QuiverError as exc:
        fail(exc)
