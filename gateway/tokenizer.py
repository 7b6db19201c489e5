"""A model directory's tokenizer and chat template, read with ``tokenizers`` and jinja2 instead of transformers.

Loaded the way transformers loads it wherever that changes a count: truncation and padding off, the named
special tokens of ``tokenizer_config.json`` (or, in older directories, ``special_tokens_map.json``) added when
``tokenizer.json`` lacks them, and ``add_bos_token``/``add_eos_token`` honoured when the config sets them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from gateway.chat_template import ChatTemplate, template_source

# Pre-tokenizers that split byte-level text without dropping any of it.
_KEEPS_EVERY_BYTE = {"ByteLevel", "Split", "Digits"}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _added_token(value: Any) -> AddedToken | None:
    """A special token as the config writes it: a string, or an AddedToken's fields."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        given = ("single_word", "lstrip", "rstrip", "normalized", "special")
        fields = {"special": True} | {k: value[k] for k in given if k in value}
        return AddedToken(value["content"], **fields)
    return None


def special_tokens(config: Mapping[str, Any], special_tokens_map: Mapping[str, Any]) -> dict[str, AddedToken]:
    """The named special tokens (``bos_token``, ``eos_token``, a model's own ``*_token``), as transformers
    resolves them."""
    given = dict(config)
    if "added_tokens_decoder" not in config:  # an older directory: its special_tokens_map.json wins
        given.update(special_tokens_map)
    named = {key: value for key, value in given.items() if key.endswith("_token")}
    extra = given.get("extra_special_tokens")
    named.update(extra if isinstance(extra, dict) else {})
    tokens = {key: _added_token(value) for key, value in named.items()}
    return {key: token for key, token in tokens.items() if token is not None}


def _add_missing(tokenizer: Tokenizer, config: Mapping[str, Any], named: Mapping[str, AddedToken]) -> None:
    decoder = config.get("added_tokens_decoder")
    listed = [_added_token(v) for v in decoder.values()] if isinstance(decoder, dict) else []
    known = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token in [*listed, *named.values()]:
        if token is not None and token.content not in known and tokenizer.token_to_id(token.content) is None:
            tokenizer.add_special_tokens([token])
            known.add(token.content)


def _frame_with_bos_eos(tokenizer: Tokenizer, config: Mapping[str, Any], named: Mapping[str, AddedToken]) -> None:
    """``add_bos_token``/``add_eos_token`` in the config replace the post-processor, as in transformers."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    bos, eos = named.get("bos_token"), named.get("eos_token")
    first = [bos.content] if bos is not None and config.get("add_bos_token") else []
    last = [eos.content] if eos is not None and config.get("add_eos_token") else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join([*(f"{t}:0" for t in first), "$A:0", *(f"{t}:0" for t in last)]),
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(first + last)],
    )


def _splits_every_byte(pre_tokenizer: Any) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [p.get("type") if isinstance(p, dict) else None for p in parts]
    dropped = any(isinstance(p, dict) and p.get("behavior") == "Removed" for p in parts)
    return "ByteLevel" in kinds and set(kinds) <= _KEEPS_EVERY_BYTE and not dropped


def longest_token_bytes(tokenizer: Tokenizer, spec: Mapping[str, Any]) -> int | None:
    """The most bytes of text one token can stand for; None when the tokenizer gives no such bound.

    It holds for byte-level BPE with no normalizer: every token stands for the bytes its string spells in the
    byte-level alphabet (one character per byte), and an added token for its content. A normalizer could
    shrink the text, and an added token that strips whitespace beside it, or a fused unknown token, can stand
    for any length.
    """
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or spec.get("normalizer") is not None:
        return None
    if model.get("unk_token") is not None and model.get("fuse_unk"):
        return None
    if not _splits_every_byte(spec.get("pre_tokenizer")):
        return None
    added = list(tokenizer.get_added_tokens_decoder().values())
    if any(t.lstrip or t.rstrip for t in added):
        return None
    regular = max((len(token) for token in tokenizer.get_vocab(with_added_tokens=False)), default=0)
    return max([regular, *(len(t.content.encode()) for t in added)]) or None


TOKENIZER_FILE = "tokenizer.json"


class ModelTokenizer:
    """Token counts under one model's tokenizer, and its chat template (None when it has none)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, longest_token_bytes: int | None) -> None:
        self._tokenizer = tokenizer
        self.template = template
        self.longest_token_bytes = longest_token_bytes

    @classmethod
    def load(cls, model_dir: Path) -> ModelTokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` and the chat template of a model directory."""
        spec_text = (model_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
        config = _read_json(model_dir / "tokenizer_config.json")
        named = special_tokens(config, _read_json(model_dir / "special_tokens_map.json"))
        tokenizer = Tokenizer.from_str(spec_text)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        _add_missing(tokenizer, config, named)
        _frame_with_bos_eos(tokenizer, config, named)
        source = template_source(model_dir, config)
        template = None if source is None else ChatTemplate(source, {k: t.content for k, t in named.items()})
        return cls(tokenizer, template, longest_token_bytes(tokenizer, json.loads(spec_text)))

    def count(self, text: str, *, special: bool, ceiling: int | None = None) -> int:
        """Tokens of ``text`` (``special``: with those the tokenizer adds around a text).

        When ``ceiling`` is given and the text's length proves more tokens than that, the proven number comes
        back instead, without tokenizing: no token stands for more than ``longest_token_bytes``.
        """
        if ceiling is not None and self.longest_token_bytes is not None:
            at_least = proven_minimum(len(text.encode()), self.longest_token_bytes)
            if at_least > ceiling:
                return at_least
        return len(self._tokenizer.encode(text, add_special_tokens=special).ids)

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        """The chat prompt with the generation prompt, as vLLM renders it; None without a chat template."""
        return None if self.template is None else self.template.render(messages, add_generation_prompt=True)


def proven_minimum(text_bytes: int, longest_token_bytes: int) -> int:
    """The fewest tokens that can spell ``text_bytes`` bytes when no token spells more than the longest."""
    return -(-text_bytes // longest_token_bytes)
