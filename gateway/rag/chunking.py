"""Packing a document's paragraphs into chunks of about N embedding-model tokens, each overlapping the last.

Paragraphs are packed whole while they fit; a longer one is cut at sentence ends, and a sentence longer
than a chunk at word boundaries. Chunks never cross a section (a markdown heading or a JSONL record), so
each one has a single heading, a line range and metadata. The tail of each chunk (whole pieces while they
fit in ``overlap`` tokens, else the last ``overlap`` tokens) starts the next one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidRequest
from gateway.rag.documents import Document, Paragraph, Section

# A tokenizer as chunking sees it: the (start, end) character offsets of each token of a text.
TokenSpans = Callable[[str], list[tuple[int, int]]]

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@dataclass(frozen=True)
class ChunkingConfig:
    """How big chunks are and how much of each one the next repeats (default a fifth), in embedding-model tokens."""

    chunk_tokens: int = 200
    overlap: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise InvalidRequest(
                f"chunk size must be at least 16 tokens, got {self.chunk_tokens}", param="chunk_tokens"
            )
        if not 0 <= self.overlap_tokens <= self.chunk_tokens // 2:
            raise InvalidRequest(
                f"overlap must be between 0 and half the chunk size ({self.chunk_tokens // 2}), got {self.overlap}",
                param="overlap",
            )

    @property
    def overlap_tokens(self) -> int:
        """The overlap asked for, or a fifth of the chunk size."""
        return self.chunk_tokens // 5 if self.overlap is None else self.overlap


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed, with where it came from."""

    text: str
    heading: str | None
    first_line: int
    last_line: int
    metadata: Mapping[str, Any]

    @property
    def location(self) -> str:
        """Where in its file: the heading path and the lines, e.g. ``Install > Linux, lines 10-24``."""
        lines = f"line {self.first_line}" if self.first_line == self.last_line else (
            f"lines {self.first_line}-{self.last_line}"
        )  # fmt: skip
        return f"{self.heading}, {lines}" if self.heading else lines

    @property
    def embedding_text(self) -> str:
        """What gets embedded: the heading too, since a paragraph often leaves its subject to the heading."""
        return f"{self.heading}\n\n{self.text}" if self.heading else self.text


@dataclass(frozen=True)
class _Piece:
    """A whole paragraph, or a sentence or word run cut from one; ``spans`` are its tokens."""

    text: str
    spans: tuple[tuple[int, int], ...]
    paragraph: int
    first_line: int
    last_line: int

    @property
    def tokens(self) -> int:
        return len(self.spans)

    def last(self, n: int) -> _Piece:
        """The piece made of this one's last ``n`` tokens."""
        start = self.spans[-n][0]
        line = min(self.last_line, self.first_line + self.text.count("\n", 0, start))
        spans = tuple((a - start, b - start) for a, b in self.spans[-n:])
        return _Piece(self.text[start:], spans, self.paragraph, line, self.last_line)


def chunk_document(document: Document, token_spans: TokenSpans, config: ChunkingConfig) -> list[Chunk]:
    """All chunks of ``document``, in reading order."""
    return [chunk for section in document.sections for chunk in _chunk_section(section, token_spans, config)]


def _chunk_section(section: Section, token_spans: TokenSpans, config: ChunkingConfig) -> Iterator[Chunk]:
    budget = config.chunk_tokens
    if section.heading:
        # The heading is embedded with every chunk; it must not push the text past the model's window.
        budget = max(budget // 2, budget - len(token_spans(section.heading)))
    current: list[_Piece] = []
    for index, paragraph in enumerate(section.paragraphs):
        for piece in _pieces(paragraph, index, token_spans, budget):
            if current and sum(p.tokens for p in current) + piece.tokens > budget:
                yield _join(section, current)
                current = _tail(current, min(config.overlap_tokens, budget - piece.tokens))
            current.append(piece)
    if current:
        yield _join(section, current)


def _pieces(paragraph: Paragraph, index: int, token_spans: TokenSpans, budget: int) -> Iterator[_Piece]:
    """The paragraph whole if it fits, else its sentences, cutting any sentence over ``budget`` at words."""
    spans = token_spans(paragraph.text)
    if len(spans) <= budget:
        if spans:
            yield _piece(paragraph, index, spans, 0, len(paragraph.text))
        return
    sentence_starts = [0] + [m.end() for m in _SENTENCE_END.finditer(paragraph.text)]
    sentence_ends = [m.start() for m in _SENTENCE_END.finditer(paragraph.text)] + [len(paragraph.text)]
    for start, end in zip(sentence_starts, sentence_ends, strict=True):
        sentence = [s for s in spans if start <= s[0] < end]
        for cut in _cuts(sentence, budget):
            yield _piece(paragraph, index, cut, cut[0][0], cut[-1][1])


def _cuts(spans: list[tuple[int, int]], budget: int) -> Iterator[list[tuple[int, int]]]:
    """Runs of at most ``budget`` tokens, each ending at a word boundary where one is not too far back."""
    i = 0
    while i < len(spans):
        j = min(i + budget, len(spans))
        # Step back out of a word (tokens that touch belong to one word) unless that halves the run.
        while j < len(spans) and j > i + budget // 2 and spans[j][0] == spans[j - 1][1]:
            j -= 1
        if j < len(spans) and spans[j][0] == spans[j - 1][1]:
            j = min(i + budget, len(spans))
        yield spans[i:j]
        i = j


def _piece(paragraph: Paragraph, index: int, spans: list[tuple[int, int]], start: int, end: int) -> _Piece:
    def line(offset: int) -> int:
        # JSONL records give every paragraph the record's one line, whatever newlines the text holds.
        return min(paragraph.last_line, paragraph.first_line + paragraph.text.count("\n", 0, offset))

    relative = tuple((a - start, b - start) for a, b in spans)
    return _Piece(paragraph.text[start:end], relative, index, line(start), line(end))


def _tail(pieces: list[_Piece], allowance: int) -> list[_Piece]:
    """The end of a chunk that the next one repeats: whole pieces within ``allowance`` tokens, else a cut."""
    if allowance <= 0:
        return []
    kept: list[_Piece] = []
    total = 0
    for piece in reversed(pieces):
        if total + piece.tokens > allowance:
            break
        kept.insert(0, piece)
        total += piece.tokens
    return kept or [pieces[-1].last(allowance)]


def _join(section: Section, pieces: list[_Piece]) -> Chunk:
    text = pieces[0].text
    for before, piece in zip(pieces, pieces[1:], strict=False):
        text += (" " if piece.paragraph == before.paragraph else "\n\n") + piece.text
    return Chunk(
        text=text,
        heading=section.heading,
        first_line=min(p.first_line for p in pieces),
        last_line=max(p.last_line for p in pieces),
        metadata=section.metadata,
    )
