"""Both RAG index backends, with the real embedder: the embedded SQLite file and PostgreSQL with pgvector."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import StatementError

from core.embeddings import Embedder
from core.errors import InvalidRequest, ModelNotFound
from gateway.rag import (
    Chunk,
    ChunkingConfig,
    Document,
    EmbeddedIndex,
    PgVectorIndex,
    VectorIndex,
    chunk_document,
    ingest,
    open_index,
    read_document,
)
from tests.postgres import (
    PostgresCluster,
    pgvector_cluster,  # noqa: F401 - a fixture, used by name
)

CORPUS = {
    "pasta.md": "# Cooking pasta\n\nBoil spaghetti in plenty of salted water for nine minutes, then drain it.\n",
    "firewall.md": "# Firewall\n\nOpen port 443 in the firewall with ufw allow 443/tcp and reload the rules.\n",
    "dogs.md": "# Training a puppy\n\nReward the dog with a treat each time it sits on command.\n",
}

# Opens a second index on the same database: another process, as far as either index can tell.
Opener = Callable[[], VectorIndex]


@pytest.fixture(params=["embedded", "pgvector"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens indexes on one fresh database of each backend; closes them after the test."""
    if request.param == "embedded":
        url = f"sqlite:///{tmp_path / 'data' / 'rag.db'}"
    else:
        cluster: PostgresCluster = request.getfixturevalue("pgvector_cluster")
        url = cluster.create_database()
    opened: list[VectorIndex] = []

    def open_one() -> VectorIndex:
        opened.append(open_index(url))
        return opened[-1]

    yield open_one
    for index in opened:
        index.close()


def _write(root: Path, files: dict[str, str]) -> list[Path]:
    root.mkdir(exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return [root / name for name in files]


def _ingest_pasta(index: VectorIndex, embedder: Embedder, root: Path) -> tuple[Document, list[Chunk]]:
    """pasta.md ingested into 'docs'; the document and its chunks as the ingest made them."""
    [path] = _write(root / "docs", {"pasta.md": CORPUS["pasta.md"]})
    ingest(index, embedder, "docs", [path])
    document = read_document(path)
    return document, chunk_document(document, embedder.token_spans, ChunkingConfig())


def test_the_url_picks_the_backend(opener: Opener, request: pytest.FixtureRequest) -> None:
    expected = {"embedded": EmbeddedIndex, "pgvector": PgVectorIndex}[request.node.callspec.params["opener"]]
    assert type(opener()) is expected


def test_search_ranks_the_matching_source_first(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    ingest(index, embedder, "docs", _write(tmp_path / "docs", CORPUS))

    for query, expected in [
        ("how long should I boil spaghetti?", "pasta.md"),
        ("which port do I open for https?", "firewall.md"),
        ("teach my puppy to sit", "dogs.md"),
    ]:
        hits = index.search("docs", embedder.encode([query])[0], k=3)
        assert [h.source for h in hits][0] == expected, query
        assert len(hits) == 3
        assert hits[0].score > hits[1].score >= hits[2].score
    top = index.search("docs", embedder.encode(["boil pasta"])[0], k=1)[0]
    assert top.location == "Cooking pasta, line 3"
    assert top.text.startswith("Boil spaghetti")
    # Cosine similarity: the stored text's own vector scores 1 against itself.
    chunk = chunk_document(read_document(tmp_path / "docs" / "pasta.md"), embedder.token_spans, ChunkingConfig())[0]
    same = index.search("docs", embedder.encode([chunk.embedding_text])[0], k=1)[0]
    assert same.score == pytest.approx(1.0, abs=1e-3)


def test_reingesting_a_changed_file_replaces_its_chunks(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    paths = _write(tmp_path / "docs", CORPUS)
    first = ingest(index, embedder, "docs", paths)
    assert [(r.name, r.chunks, r.unchanged) for r in first] == [(n, 1, False) for n in CORPUS]

    # The same files again: nothing re-embedded, nothing duplicated.
    again = ingest(index, embedder, "docs", paths)
    assert [r.unchanged for r in again] == [True, True, True]
    # One file changed: its old chunk is gone, the new ones are in, the others untouched.
    (tmp_path / "docs" / "pasta.md").write_text(
        "# Cooking pasta\n\nCook penne for eleven minutes.\n\n## Sauce\n\nSimmer tomatoes with garlic.\n"
    )
    changed = ingest(index, embedder, "docs", paths)
    assert [(r.name, r.chunks, r.unchanged) for r in changed] == [
        ("pasta.md", 2, False), ("firewall.md", 0, True), ("dogs.md", 0, True),
    ]  # fmt: skip

    [info] = index.collections()
    assert (info.name, info.sources, info.chunks, info.dimension) == ("docs", 3, 4, embedder.dimension)
    texts = [h.text for h in index.search("docs", embedder.encode(["spaghetti"])[0], k=10)]
    assert len(texts) == 4
    assert not any("spaghetti" in t for t in texts)
    assert "Cook penne for eleven minutes." in texts


def test_another_process_sees_new_chunks_at_its_next_search(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    gateway, cli = opener(), opener()
    paths = _write(tmp_path / "docs", CORPUS)
    ingest(cli, embedder, "docs", paths[:1])
    query = embedder.encode(["open a port in the firewall"])[0]
    assert [h.source for h in gateway.search("docs", query, k=5)] == ["pasta.md"]

    ingest(cli, embedder, "docs", paths[1:])
    assert gateway.search("docs", query, k=5)[0].source == "firewall.md"
    cli.drop("docs")
    with pytest.raises(ModelNotFound):
        gateway.search("docs", query, k=5)
    # A new collection of the same name is not mistaken for the dropped one.
    ingest(cli, embedder, "docs", paths[2:])
    assert [h.source for h in gateway.search("docs", query, k=5)] == ["dogs.md"]


def test_a_failed_write_leaves_the_previous_chunks(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    document, chunks = _ingest_pasta(index, embedder, tmp_path)
    broken = [replace(c, metadata={"bad": object()}) for c in chunks]

    # The old chunks are deleted first in the transaction; the insert fails, so the delete never happened.
    with pytest.raises(StatementError, match="not JSON serializable"):
        index.upsert("docs", document, broken, embedder.encode([c.embedding_text for c in chunks]))
    hits = index.search("docs", embedder.encode(["spaghetti"])[0], k=5)
    assert [h.text for h in hits] == [chunks[0].text]


def test_an_unknown_collection_names_the_ones_there_are(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    ingest(index, embedder, "recipes", _write(tmp_path / "docs", {"pasta.md": CORPUS["pasta.md"]}))
    query = np.zeros(embedder.dimension, dtype=np.float32)

    with pytest.raises(ModelNotFound, match="RAG collection 'manuals' does not exist; collections: recipes"):
        index.search("manuals", query, k=3)
    with pytest.raises(ModelNotFound, match="collections: recipes"):
        index.drop("manuals")
    assert index.source_hashes("manuals") == {}


def test_delete_source_and_drop(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    paths = _write(tmp_path / "docs", CORPUS)
    ingest(index, embedder, "docs", paths)
    ingest(index, embedder, "other", paths[:1])

    assert index.delete_source("docs", str(paths[0].resolve()))
    assert not index.delete_source("docs", str(paths[0].resolve()))
    assert [(c.name, c.sources, c.chunks) for c in index.collections()] == [("docs", 2, 2), ("other", 1, 1)]
    index.drop("docs")
    assert [c.name for c in index.collections()] == ["other"]


def test_a_collection_keeps_one_embedding_space(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    document, chunks = _ingest_pasta(index, embedder, tmp_path)

    with pytest.raises(InvalidRequest, match="holds all-MiniLM-L6-v2 vectors \\(384 dimensions\\)"):
        index.upsert("docs", document, chunks, np.ones((len(chunks), 8), dtype=np.float32))
    with pytest.raises(InvalidRequest, match="invalid collection name"):
        index.upsert("Bad Name", document, [], np.zeros((0, 384), dtype=np.float32))


def test_a_malformed_file_stops_the_ingest_before_anything_is_written(
    opener: Opener, embedder: Embedder, tmp_path: Path
) -> None:
    index = opener()
    paths = _write(tmp_path / "docs", {"pasta.md": CORPUS["pasta.md"], "faq.jsonl": '{"text": "ok"}\n{oops}\n'})

    with pytest.raises(InvalidRequest, match="faq.jsonl:2: not valid JSON"):
        ingest(index, embedder, "docs", paths)
    assert index.collections() == []


def test_a_jsonl_records_fields_come_back_with_its_hits(opener: Opener, embedder: Embedder, tmp_path: Path) -> None:
    index = opener()
    faq = '{"text": "Refunds take five business days.", "url": "https://example.com/refunds", "tags": ["billing"]}\n'
    ingest(index, embedder, "faq", _write(tmp_path / "docs", {"faq.jsonl": faq}))

    [hit] = index.search("faq", embedder.encode(["when is my refund paid?"])[0], k=3)
    assert (hit.source, hit.location, hit.text) == ("faq.jsonl", "line 1", "Refunds take five business days.")
    assert hit.metadata == {"url": "https://example.com/refunds", "tags": ["billing"]}
