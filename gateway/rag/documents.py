"""Reading files for the RAG index: plain text, markdown and JSONL, as sections of located paragraphs.

Markdown splits into sections at ATX headings (``#`` to ``######``, outside code fences), each section
named by its heading path (``Install > Linux``). Plain text is one section. In JSONL each line is a
record, its own section: a string ``text`` field plus any other fields, kept as the record's metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@dataclass(frozen=True)
class Paragraph:
    """A block of text and the 1-based lines of its file it spans."""

    text: str
    first_line: int
    last_line: int


@dataclass(frozen=True)
class Section:
    """Paragraphs under one heading (or one JSONL record), chunked together and never with another section."""

    heading: str | None
    paragraphs: tuple[Paragraph, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Document:
    """One file as read for ingestion; ``path`` (absolute) and ``sha256`` identify it in an index."""

    path: str
    name: str
    sha256: str
    sections: tuple[Section, ...]


def read_document(path: Path) -> Document:
    """Read ``path`` as markdown, JSONL or plain text by its suffix; malformed input raises ``InvalidRequest``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}", param="files") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{path} is not UTF-8 text (byte {exc.start})", param="files") from None
    suffix = path.suffix.lower()
    lines = text.splitlines()
    if suffix in JSONL_SUFFIXES:
        sections = tuple(_jsonl_sections(path, lines))
    elif suffix in MARKDOWN_SUFFIXES:
        sections = tuple(_markdown_sections(lines))
    else:
        paragraphs = tuple(_paragraphs(lines, 1))
        sections = (Section(None, paragraphs),) if paragraphs else ()
    return Document(str(path.resolve()), path.name, hashlib.sha256(raw).hexdigest(), sections)


def _paragraphs(lines: list[str], first_line: int) -> Iterator[Paragraph]:
    """Blank-line separated blocks; a fenced code block stays whole, blank lines and all."""
    block: list[str] = []
    start = first_line
    fence: str | None = None
    for number, line in enumerate(lines, first_line):
        fence, in_code = _track_fence(line, fence)
        if not in_code and not line.strip():
            if block:
                yield Paragraph("\n".join(block).strip(), start, number - 1)
            block = []
            continue
        if not block:
            start = number
        block.append(line)
    if block:
        yield Paragraph("\n".join(block).strip(), start, start + len(block) - 1)


def _track_fence(line: str, fence: str | None) -> tuple[str | None, bool]:
    """The code fence open after ``line`` (None: none), and whether ``line`` belongs to a fenced block."""
    if fence is None:
        opened = _FENCE.match(line)
        return (opened.group(1)[0] * 3, True) if opened else (None, False)
    return (None if line.strip().startswith(fence) else fence), True


def _markdown_sections(lines: list[str]) -> Iterator[Section]:
    headings: list[tuple[int, str]] = []  # (level, title) from the top level down
    body_start = 0
    fence: str | None = None

    def section(end: int) -> Iterator[Section]:
        paragraphs = tuple(_paragraphs(lines[body_start:end], body_start + 1))
        if paragraphs:
            yield Section(" > ".join(title for _, title in headings) or None, paragraphs)

    for index, line in enumerate(lines):
        fence, in_code = _track_fence(line, fence)
        heading = None if in_code else _HEADING.match(line)
        if heading is None:
            continue
        yield from section(index)
        level, title = len(heading.group(1)), heading.group(2).strip()
        headings = [(lvl, t) for lvl, t in headings if lvl < level] + [(level, title)]
        body_start = index + 1
    yield from section(len(lines))


def _jsonl_sections(path: Path, lines: list[str]) -> Iterator[Section]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}:{number}: not valid JSON ({exc.msg})", param="files") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise InvalidRequest(f"{path}:{number}: expected a JSON object, got {kind}", param="files")
        text = record.pop("text", None)
        if not isinstance(text, str):
            problem = "has no 'text' field" if text is None else f"'text' is {type(text).__name__}, not a string"
            raise InvalidRequest(f"{path}:{number}: the record {problem}", param="files")
        # A long record still splits into paragraphs; all of them carry the record's line.
        paragraphs = tuple(Paragraph(p.text, number, number) for p in _paragraphs(text.splitlines(), 1))
        if paragraphs:
            yield Section(None, paragraphs, record)
