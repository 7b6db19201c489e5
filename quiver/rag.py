"""``quiver rag``: ingest documents into RAG collections, list them, query them, delete them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from core.errors import QuiverError
from quiver.context import console, err, fail

if TYPE_CHECKING:
    from gateway.rag import VectorIndex

rag_app = typer.Typer(no_args_is_help=True, help="RAG collections: ingest documents, query them.")


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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
    finally:
        index.close()
    console.print(f"deleted collection '{collection}'")
