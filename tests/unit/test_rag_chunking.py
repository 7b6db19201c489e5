"""Reading files for the RAG index and chunking them, with the embedding model's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.embeddings import Embedder
from core.errors import InvalidRequest
from gateway.rag import ChunkingConfig, chunk_document, read_document

GUIDE = """\
# Quiver

Quiver serves many adapters.

## Install

Run pip install quiver.

```bash
# a comment, not a heading

pip install quiver
```

### Linux

Use a virtual environment.

## Usage

Start it with quiver up.
"""


def _tokens(embedder: Embedder, text: str) -> int:
    return len(embedder.token_spans(text))


def test_markdown_sections_follow_headings_and_chunks_say_where_they_are(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "guide.md"
    path.write_text(GUIDE)
    document = read_document(path)
    chunks = chunk_document(document, embedder.token_spans, ChunkingConfig())

    assert document.name == "guide.md"
    assert document.path == str(path.resolve())
    assert [(c.heading, c.location) for c in chunks] == [
        ("Quiver", "Quiver, line 3"),
        # The code block stays in its section, blank line and '#' line included.
        ("Quiver > Install", "Quiver > Install, lines 7-13"),
        ("Quiver > Install > Linux", "Quiver > Install > Linux, line 17"),
        ("Quiver > Usage", "Quiver > Usage, line 21"),
    ]
    assert "# a comment, not a heading\n\npip install quiver" in chunks[1].text
    assert chunks[3].embedding_text == "Quiver > Usage\n\nStart it with quiver up."


def test_short_paragraphs_are_packed_into_one_chunk(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph here.\n\nSecond one\nover two lines.\n\n\nThird.\n")
    chunks = chunk_document(read_document(path), embedder.token_spans, ChunkingConfig(chunk_tokens=64))

    assert len(chunks) == 1
    assert chunks[0].text == "First paragraph here.\n\nSecond one\nover two lines.\n\nThird."
    assert chunks[0].location == "lines 1-7"
    assert chunks[0].heading is None


def test_a_long_paragraph_is_split_into_chunks_within_the_size_that_overlap(tmp_path: Path, embedder: Embedder) -> None:
    sentences = [f"Sentence number {n} talks about topic {n * 7} at some length." for n in range(60)]
    path = tmp_path / "long.txt"
    path.write_text(" ".join(sentences) + "\n")
    config = ChunkingConfig(chunk_tokens=64, overlap=16)
    chunks = chunk_document(read_document(path), embedder.token_spans, config)

    assert len(chunks) > 5
    assert all(_tokens(embedder, c.text) <= 64 for c in chunks)
    # Every sentence is in some chunk, and chunks come in reading order.
    text = " ".join(c.text for c in chunks)
    assert all(s in text for s in sentences)
    firsts = [sentences.index(next(s for s in sentences if s in c.text)) for c in chunks]
    assert firsts == sorted(firsts)
    for before, after in zip(chunks, chunks[1:], strict=False):
        # The next chunk starts with the end of this one (whole sentences, at most the overlap).
        shared = next(n for n in range(len(after.text), 0, -1) if before.text.endswith(after.text[:n]))
        assert 0 < _tokens(embedder, after.text[:shared]) <= 16


def test_a_sentence_longer_than_a_chunk_is_cut_at_word_boundaries(tmp_path: Path, embedder: Embedder) -> None:
    words = [f"word{n}" for n in range(300)]
    path = tmp_path / "run-on.txt"
    path.write_text(" ".join(words))
    chunks = chunk_document(read_document(path), embedder.token_spans, ChunkingConfig(chunk_tokens=50, overlap=0))

    assert len(chunks) > 3
    assert all(_tokens(embedder, c.text) <= 50 for c in chunks)
    # No word is torn in two, and with no overlap every word appears exactly once.
    assert [w for c in chunks for w in c.text.split()] == words


def test_jsonl_records_keep_their_fields_as_metadata_and_their_line(tmp_path: Path, embedder: Embedder) -> None:
    path = tmp_path / "faq.jsonl"
    records = [{"text": "How to reset a password.", "url": "https://example.com/reset", "lang": "en"},
               {"text": "Billing happens monthly.", "tags": ["billing"]}]  # fmt: skip
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    chunks = chunk_document(read_document(path), embedder.token_spans, ChunkingConfig())

    # One chunk per record: records are never packed together, since their metadata differ.
    assert [(c.text, c.location, dict(c.metadata)) for c in chunks] == [
        ("How to reset a password.", "line 1", {"url": "https://example.com/reset", "lang": "en"}),
        ("Billing happens monthly.", "line 3", {"tags": ["billing"]}),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', "faq.jsonl:2: not valid JSON"),
        ('{"title": "no text"}', "faq.jsonl:2: the record has no 'text' field"),
        ('{"text": 42}', "faq.jsonl:2: the record 'text' is int, not a string"),
        ('["text"]', "faq.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_a_malformed_jsonl_line_is_an_error_naming_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "faq.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InvalidRequest) as caught:
        read_document(path)
    assert message in caught.value.message
    assert str(path) in caught.value.message


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidRequest, match="latin1.txt is not UTF-8"):
        read_document(path)


@pytest.mark.parametrize(("chunk_tokens", "overlap"), [(8, 0), (100, 51), (100, -1)])
def test_chunking_config_refuses_sizes_that_cannot_work(chunk_tokens: int, overlap: int) -> None:
    with pytest.raises(InvalidRequest):
        ChunkingConfig(chunk_tokens=chunk_tokens, overlap=overlap)
