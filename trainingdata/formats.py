"""Training data formats: load a file's records as chat or preference examples, refusing malformed ones.

Formats, detected per file from its records' keys (every record of a file must be the same format):

    openai_chat   {"messages": [{"role", "content"}, ...], "weight"?: number}
    alpaca        {"instruction", "input"?, "output", "system"?, "weight"?}
    sharegpt      {"conversations": [{"from": human|gpt|system, "value"}, ...], "system"?, "weight"?}
    preference    {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": same}

Files are JSON Lines (``.jsonl``, one record a line, blank lines allowed) or a JSON array (``.json``).
Every malformed record is reported with the file, its 1-based line and what is wrong, all in one
``DataError``; nothing is skipped. A record's ``weight`` (a whole number, default 1) is how many times it
counts in training; 0 leaves it out. Extra keys such as ``id`` are ignored, but keys that would change
what is trained and that Quiver does not train on (tools, per-message weights, ``history``) are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast, overload

from core.errors import InvalidRequest

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

# How many malformed records one error lists; the count says how many more there are.
MAX_LISTED_PROBLEMS = 20


class DataError(InvalidRequest):
    """Training data that cannot be used as it is; the message names the file, line and problem.

    ``problems`` holds one ``file:line: what`` string per malformed record (the message lists the first 20).
    """

    default_code = "invalid_training_data"

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class DataFormat(StrEnum):
    """The record formats ``load_examples`` understands."""

    OPENAI_CHAT = "openai_chat"
    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    PREFERENCE = "preference"

    @property
    def label(self) -> str:
        """How error messages name the format."""
        return _FORMAT_LABELS[self]


_FORMAT_LABELS = {
    DataFormat.OPENAI_CHAT: "OpenAI chat ('messages')",
    DataFormat.ALPACA: "alpaca ('instruction'/'output')",
    DataFormat.SHAREGPT: "ShareGPT ('conversations')",
    DataFormat.PREFERENCE: "preference pairs ('prompt'/'chosen'/'rejected')",
}
# The keys that identify a format; a record showing keys of two formats is ambiguous.
_SIGNATURES = {
    DataFormat.OPENAI_CHAT: frozenset({"messages"}),
    DataFormat.ALPACA: frozenset({"instruction", "output"}),
    DataFormat.SHAREGPT: frozenset({"conversations"}),
    DataFormat.PREFERENCE: frozenset({"chosen", "rejected"}),
}
# Keys that carry meaning we would otherwise drop on the floor: refused, with the reason.
_REFUSED_RECORD_KEYS = {
    "tools": "tool definitions are not supported",
    "functions": "function definitions are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "history": "alpaca 'history' (earlier turns) is not supported; write multi-turn data as OpenAI chat",
}
_REFUSED_MESSAGE_KEYS = {
    "weight": "per-message 'weight' is not supported; put 'weight' on the record",
    "tool_calls": "tool calls are not supported",
    "function_call": "function calls are not supported",
    "tool_call_id": "tool results are not supported",
}
_SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        """The OpenAI / chat-template shape, ``{"role", "content"}``."""
        return {"role": self.role, "content": self.content}


def _prompt_text(messages: Sequence[Message]) -> str:
    # The system prompt is left out on purpose: it is usually shared by every example and
    # would make unrelated examples look alike to the leakage check.
    return "\n".join(m.content for m in messages if m.role == "user")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record:
    """Where a training record came from, for every error and report that names it."""

    source: str
    line: int

    @property
    def where(self) -> str:
        """``file:line`` of the record."""
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatExample(_Record):
    """A conversation to learn from: optional system, then user/assistant turns ending with the assistant."""

    messages: tuple[Message, ...]
    weight: float = 1.0

    @property
    def prompt_text(self) -> str:
        """The user turns, which the leakage check compares."""
        return _prompt_text(self.messages)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreferenceExample(_Record):
    """A prompt (ending with a user turn) with a preferred and a dispreferred assistant reply."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    @property
    def prompt_text(self) -> str:
        """The user turns of the prompt, which the leakage check compares."""
        return _prompt_text(self.prompt)


Example = ChatExample | PreferenceExample
E = TypeVar("E", bound=Example)


@dataclass(frozen=True)
class DataFile(Sequence[Example]):
    """The examples of one training file, all of one format, with the file's hash; a sequence of them."""

    path: Path
    format: DataFormat
    examples: tuple[ChatExample, ...] | tuple[PreferenceExample, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Example, ...]: ...
    def __getitem__(self, index: int | slice) -> Example | tuple[Example, ...]:
        return self.examples[index]

    def chat_examples(self) -> tuple[ChatExample, ...]:
        """The examples for supervised fine-tuning; refuses a file of preference pairs."""
        if self.format is DataFormat.PREFERENCE:
            raise DataError(f"{self.path}: holds preference pairs, which train with DPO, not supervised fine-tuning")
        return cast(tuple[ChatExample, ...], self.examples)

    def preference_examples(self) -> tuple[PreferenceExample, ...]:
        """The examples for DPO; refuses a file of conversations."""
        if self.format is not DataFormat.PREFERENCE:
            raise DataError(
                f"{self.path}: holds {self.format.label} records; DPO needs preference pairs "
                "('prompt'/'chosen'/'rejected')"
            )
        return cast(tuple[PreferenceExample, ...], self.examples)

    def fingerprint(self) -> dict[str, str | int]:
        """What the manifest records about the file: content hash, record count and format."""
        return {"sha256": self.sha256, "count": len(self.examples), "format": self.format.value}


# --- loading ----------------------------------------------------------------------------------------


class _Bad(Exception):
    """What is wrong with one record; becomes a line of the file's DataError."""


def load_examples(path: Path | str) -> DataFile:
    """Read a ``.jsonl`` or ``.json`` training file, detect its format and convert every record.

    Raises ``DataError`` listing every malformed record (file, 1-based line, what is wrong), and for
    an unreadable, empty or mixed-format file.
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a directory, not a data file") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc.strerror or exc}") from None

    problems: list[tuple[int, str]] = []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(raw, problems)
    elif suffix == ".json":
        records = _json_array_records(source, raw)
    else:
        raise DataError(f"{source}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl or .json")

    # Each record is detected and converted on its own, so that one file error lists every bad
    # record; the file's format is that of its first good record.
    converted: list[tuple[int, DataFormat, Example | _Bad]] = []
    for line, obj in records:
        try:
            fmt, record = _detect(obj)
        except _Bad as exc:
            problems.append((line, str(exc)))
            continue
        try:
            converted.append((line, fmt, _CONVERTERS[fmt](record, source, line)))
        except _Bad as exc:
            converted.append((line, fmt, exc))

    if not converted and not problems:
        raise DataError(f"{source}: no records; the file is empty")
    good = (item for item in converted if not isinstance(item[2], _Bad))
    anchor = next(good, converted[0] if converted else None)
    format_line, file_format = (anchor[0], anchor[1]) if anchor else (0, None)
    examples: list[Example] = []
    for line, fmt, result in converted:
        if file_format is not None and fmt is not file_format:
            problems.append(
                (
                    line,
                    f"this record is {fmt.label} but the file is {file_format.label} (from line {format_line}); "
                    "a file holds one format",
                )
            )
        elif isinstance(result, _Bad):
            problems.append((line, str(result)))
        else:
            examples.append(result)

    if problems:
        problems.sort(key=lambda problem: problem[0])
        _raise_problems(source, problems)
    assert file_format is not None and examples  # no problems, so every record converted
    return DataFile(
        path=path,
        format=file_format,
        examples=cast(tuple[ChatExample, ...] | tuple[PreferenceExample, ...], tuple(examples)),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def file_fingerprint(path: Path | str) -> dict[str, str | int]:
    """``{"sha256", "count", "format"}`` of a training file, validating it on the way."""
    return load_examples(path).fingerprint()


def _raise_problems(source: str, problems: Sequence[tuple[int, str]]) -> NoReturn:
    lines = [f"{source}:{line}: {what}" for line, what in problems]
    if len(lines) == 1:
        raise DataError(lines[0], problems=lines)
    listed = "\n".join(f"  {text}" for text in lines[:MAX_LISTED_PROBLEMS])
    more = len(lines) - MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(f"{source}: {len(lines)} malformed records:\n{listed}{tail}", problems=lines)


def _jsonl_records(raw: bytes, problems: list[tuple[int, str]]) -> list[tuple[int, object]]:
    records: list[tuple[int, object]] = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]  # a byte-order mark from an editor, not data
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"not valid UTF-8 (byte {exc.start + 1} of the line)"))
            continue
        if not text.strip():
            continue
        try:
            records.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            problems.append((number, f"bad JSON: {exc.msg} at column {exc.colno}"))
    return records


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, position: int) -> int:
    match = _JSON_SPACE.match(text, position)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _json_array_records(source: str, raw: bytes) -> list[tuple[int, object]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{source}:{line}: not valid UTF-8") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}:{exc.lineno}: bad JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, list):
        raise DataError(
            f"{source}:1: a .json data file must hold a JSON array of records, not {_json_type(data)}; "
            "use .jsonl for one record per line"
        )
    # The array parsed, so walk it again only to learn the line each record starts on.
    decoder = json.JSONDecoder()
    records: list[tuple[int, object]] = []
    position = _skip_space(text, 0) + 1  # past '['
    line, counted_to = 1, 0
    for item in data:
        position = _skip_space(text, position)
        line += text.count("\n", counted_to, position)
        counted_to = position
        records.append((line, item))
        _, position = decoder.raw_decode(text, position)
        position = _skip_space(text, position) + 1  # past ',' or ']'
    return records


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _detect(obj: object) -> tuple[DataFormat, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _Bad(f"a record must be a JSON object, not {_json_type(obj)}")
    keys = obj.keys()
    matches = [fmt for fmt, signature in _SIGNATURES.items() if signature.intersection(keys)]
    if len(matches) == 1:
        return matches[0], obj
    if matches:
        names = " and ".join(fmt.label for fmt in matches)
        raise _Bad(f"ambiguous record: it has keys of {names}")
    found = ", ".join(repr(key) for key in list(keys)[:8]) or "none"
    raise _Bad(
        f"unknown record format (keys: {found}); expected 'messages' (OpenAI chat), 'instruction'/'output' "
        "(alpaca), 'conversations' (ShareGPT) or 'prompt'/'chosen'/'rejected' (preference pairs)"
    )


def _refuse_keys(obj: Mapping[str, object], refused: Mapping[str, str], where: str = "") -> None:
    for key, reason in refused.items():
        if key in obj:
            raise _Bad(f"{where}{key!r}: {reason}")


def _require(obj: Mapping[str, object], key: str) -> object:
    if key not in obj:
        raise _Bad(f"missing key {key!r}")
    return obj[key]


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string, not {_json_type(value)}")
    if not value.strip():
        raise _Bad(f"{what} is empty")
    return value


def _optional_text(obj: Mapping[str, object], key: str) -> str | None:
    # Optional fields exported as "" or null mean "absent", as in the alpaca data itself.
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, repr(key))


def _weight(obj: Mapping[str, object]) -> float:
    value = obj.get("weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"'weight' must be a number, not {_json_type(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Bad(f"'weight' must be a finite number >= 0, not {value}")
    if value != int(value):
        # Whole weights are exact as repetition; a fractional loss weight would need a trainer of our own.
        raise _Bad(f"'weight' must be a whole number (an example counts that many times; 0 leaves it out), not {value}")
    return float(value)


def _message(value: object, number: int) -> Message:
    where = f"message {number}"
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be an object with 'role' and 'content', not {_json_type(value)}")
    _refuse_keys(value, _REFUSED_MESSAGE_KEYS, f"{where}: ")
    if "role" not in value:
        raise _Bad(f"{where} has no 'role'")
    role = value["role"]
    if role not in ROLES:
        raise _Bad(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
    if "content" not in value:
        raise _Bad(f"{where} ({role}) has no 'content'")
    return Message(role=role, content=_text(value["content"], f"{where} ({role}) content"))


def _messages(value: object, key: str) -> list[Message]:
    if not isinstance(value, list):
        raise _Bad(f"{key!r} must be a list of messages, not {_json_type(value)}")
    if not value:
        raise _Bad(f"{key!r} is an empty list")
    return [_message(item, number) for number, item in enumerate(value, start=1)]


def _check_turns(messages: Sequence[Message], *, last: Role, what: str = "message") -> None:
    """An optional system message first, then user and assistant alternating, ending with ``last``."""
    for number, message in enumerate(messages, start=1):
        if message.role == "system" and number > 1:
            raise _Bad(f"{what} {number} is a system message; only the first {what} may be")
    offset = 1 if messages[0].role == "system" else 0
    if len(messages) == offset:
        raise _Bad("there is only a system message")
    for number, message in enumerate(messages[offset:], start=offset + 1):
        expected: Role = "user" if (number - offset) % 2 == 1 else "assistant"
        if message.role != expected:
            raise _Bad(
                f"{what} {number} is from the {message.role} where the {expected} was expected; "
                "turns must alternate user, assistant, user, ..."
            )
    if messages[-1].role != last:
        why = "the reply to learn" if last == "assistant" else "what the replies answer"
        raise _Bad(f"the last {what} is from the {messages[-1].role}; it must be from the {last} ({why})")


def _openai_chat(obj: dict[str, Any], source: str, line: int) -> ChatExample:
    _refuse_keys(obj, _REFUSED_RECORD_KEYS)
    messages = _messages(obj["messages"], "messages")
    _check_turns(messages, last="assistant")
    return ChatExample(messages=tuple(messages), weight=_weight(obj), source=source, line=line)


def _alpaca(obj: dict[str, Any], source: str, line: int) -> ChatExample:
    _refuse_keys(obj, _REFUSED_RECORD_KEYS)
    instruction = _text(_require(obj, "instruction"), "'instruction'")
    output = _text(_require(obj, "output"), "'output'")
    extra_input = _optional_text(obj, "input")
    system = _optional_text(obj, "system")
    # The usual alpaca rendering: the input, when there is one, follows the instruction.
    user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    messages = [Message("user", user), Message("assistant", output)]
    if system:
        messages.insert(0, Message("system", system))
    return ChatExample(messages=tuple(messages), weight=_weight(obj), source=source, line=line)


def _sharegpt(obj: dict[str, Any], source: str, line: int) -> ChatExample:
    _refuse_keys(obj, _REFUSED_RECORD_KEYS)
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise _Bad(f"'conversations' must be a list of turns, not {_json_type(turns)}")
    if not turns:
        raise _Bad("'conversations' is an empty list")
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=1):
        where = f"turn {number}"
        if not isinstance(turn, dict):
            raise _Bad(f"{where} must be an object with 'from' and 'value', not {_json_type(turn)}")
        _refuse_keys(turn, _REFUSED_MESSAGE_KEYS, f"{where}: ")
        if "from" not in turn:
            raise _Bad(f"{where} has no 'from'")
        speaker = turn["from"]
        if speaker not in _SHAREGPT_ROLES:
            raise _Bad(f"{where} is from {speaker!r}; expected one of human, gpt, system")
        if "value" not in turn:
            raise _Bad(f"{where} ({speaker}) has no 'value'")
        role = _SHAREGPT_ROLES[speaker]
        messages.append(Message(role, _text(turn["value"], f"{where} ({speaker}) value")))
    system = _optional_text(obj, "system")
    if system is not None:
        if messages[0].role == "system":
            raise _Bad("both a 'system' key and a system turn; give the system prompt once")
        messages.insert(0, Message("system", system))
    _check_turns(messages, last="assistant", what="turn")
    return ChatExample(messages=tuple(messages), weight=_weight(obj), source=source, line=line)


def _reply(value: object, key: str) -> str:
    if isinstance(value, list):
        # TRL's conversational form: a one-message list holding the assistant's reply.
        if len(value) != 1:
            raise _Bad(f"{key!r} must be a string or a list of one assistant message, not {len(value)} messages")
        message = _message(value[0], 1)
        if message.role != "assistant":
            raise _Bad(f"{key!r} holds a {message.role} message; it must be the assistant's reply")
        return message.content
    return _text(value, repr(key))


def _preference(obj: dict[str, Any], source: str, line: int) -> PreferenceExample:
    _refuse_keys(obj, _REFUSED_RECORD_KEYS)
    if "prompt" not in obj:
        raise _Bad(
            "missing key 'prompt' (preference pairs with the prompt inside 'chosen'/'rejected' are not "
            "supported; put the shared turns in 'prompt')"
        )
    prompt_value = obj["prompt"]
    if isinstance(prompt_value, list):
        prompt = _messages(prompt_value, "prompt")
        _check_turns(prompt, last="user")
    else:
        prompt = [Message("user", _text(prompt_value, "'prompt'"))]
    chosen = _reply(_require(obj, "chosen"), "chosen")
    rejected = _reply(_require(obj, "rejected"), "rejected")
    if chosen.strip() == rejected.strip():
        raise _Bad("'chosen' and 'rejected' are the same text; the pair teaches nothing")
    return PreferenceExample(prompt=tuple(prompt), chosen=chosen, rejected=rejected, source=source, line=line)


_CONVERTERS: dict[DataFormat, Callable[[dict[str, Any], str, int], Example]] = {
    DataFormat.OPENAI_CHAT: _openai_chat,
    DataFormat.ALPACA: _alpaca,
    DataFormat.SHAREGPT: _sharegpt,
    DataFormat.PREFERENCE: _preference,
}
