"""A model's chat template, rendered with jinja2 the way transformers renders it, without transformers.

The environment is transformers' own (``transformers/utils/chat_template_utils.py``): a sandbox that cannot
change what it is given, ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks,
the globals ``raise_exception`` and ``strftime_now``, and a ``tojson`` filter that leaves non-ASCII text as
it is. The source is found where transformers looks: ``chat_template.jinja`` first, then ``chat_template``
in ``tokenizer_config.json`` (one template, or a list of named ones of which ``default`` is used).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import InvalidRequest

TEMPLATE_FILE = "chat_template.jinja"


class _Refusal(jinja2.TemplateError):
    """The template called ``raise_exception``: it does not accept these messages."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (training templates mark what the assistant says) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        block = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
        block.set_lineno(lineno)
        return block

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _Refusal(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt's tokens.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def template_source(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The model's chat template source, or None when it has none."""
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    given = tokenizer_config.get("chat_template")
    if isinstance(given, str):
        return given
    if isinstance(given, list):
        named = {t.get("name"): t.get("template") for t in given if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


class ChatTemplate:
    """A compiled chat template with the model's special-token variables (``bos_token``, ``eos_token``, ...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self._template = _environment().from_string(source)
        self._special_tokens = dict(special_tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text; InvalidRequest (400) when the template refuses the messages."""
        try:
            return self._template.render(
                **self._special_tokens,
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
            )
        except _Refusal as exc:
            raise InvalidRequest(
                f"the model's chat template refused the messages: {exc.message}", param="messages"
            ) from None
