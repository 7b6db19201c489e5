"""The RAG path: retrieve sources for the user's question and put them in the prompt, within a token budget.

The sources go into the system message (after an existing system prompt, which is kept), numbered
[1]..[k] best first, each with its file and location, with an instruction to answer from them and
cite them by number. When the prompt would exceed the budget, the lowest-scored sources go first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from core.embeddings import Embedder
from core.errors import InvalidRequest
from gateway.rag.backends import index_url, open_index
from gateway.rag.index import CollectionInfo, Source, VectorIndex

INSTRUCTION = (
    "Answer the user's question using only the numbered sources below. Cite the sources you use by their "
    "number in square brackets, like [1]. If the sources do not contain the answer, say that you do not know."
)

# Tokens a chat template adds around each message (role markers, separators): an estimate.
MESSAGE_OVERHEAD_TOKENS = 4

if TYPE_CHECKING:
    from gateway.settings import Settings

Message = dict[str, Any]


@dataclass(frozen=True)
class RagPrompt:
    """The messages to send upstream and the sources they include, numbered [1]..[n] in this order."""

    messages: list[Message]
    sources: list[Source]


class RagPath:
    """Retrieval from a ``VectorIndex`` with the embedder that built it, and prompt assembly."""

    def __init__(
        self, index: VectorIndex, embedder: Embedder, count_tokens: Callable[[str], int] | None = None
    ) -> None:
        self.index = index
        self.embedder = embedder
        # The upstream model's tokenizer counts best; the embedder's is a stand-in of the same order.
        self.count_tokens = count_tokens or (lambda text: len(embedder.token_spans(text)))

    @classmethod
    def open(cls, settings: Settings, count_tokens: Callable[[str], int] | None = None) -> RagPath:
        """The index ``settings`` name (``QUIVER_RAG_URL``) and the embedder; loading the model takes seconds."""
        return cls(open_index(index_url(settings)), Embedder(), count_tokens)

    def close(self) -> None:
        """Release the index's connections."""
        self.index.close()

    def retrieve(self, collection: str, query: str, k: int = 4) -> list[Source]:
        """The ``k`` sources most similar to ``query``, best first. Blocking: embeds the query."""
        if k < 1:
            raise InvalidRequest(f"k must be at least 1, got {k}", param="k")
        vector = self.embedder.encode([query])[0]
        return self.index.search(collection, vector, k)

    async def aretrieve(self, collection: str, query: str, k: int = 4) -> list[Source]:
        """``retrieve`` in a worker thread, off the event loop."""
        return await anyio.to_thread.run_sync(self.retrieve, collection, query, k)

    async def acollections(self) -> list[CollectionInfo]:
        """The index's collections, read in a worker thread."""
        return await anyio.to_thread.run_sync(self.index.collections)

    def build_messages(
        self, messages: Sequence[Message], sources: Sequence[Source], max_prompt_tokens: int | None = None
    ) -> RagPrompt:
        """``messages`` with ``sources`` in the system message; see ``build_messages``."""
        return build_messages(messages, sources, max_prompt_tokens, self.count_tokens)

    async def abuild_messages(
        self, messages: Sequence[Message], sources: Sequence[Source], max_prompt_tokens: int | None = None
    ) -> RagPrompt:
        """``build_messages`` in a worker thread (counting tokens is tokenizer work)."""
        return await anyio.to_thread.run_sync(self.build_messages, messages, sources, max_prompt_tokens)


def question(messages: Sequence[Message]) -> str:
    """The text of the last user message: what the RAG path retrieves for."""
    for message in reversed(messages):
        if message.get("role") == "user":
            text = content_text(message.get("content"))
            if text.strip():
                return text
            break
    raise InvalidRequest("the RAG path needs a user message with text to retrieve for", param="messages")


def content_text(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined (OpenAI content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def build_messages(
    messages: Sequence[Message],
    sources: Sequence[Source],
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> RagPrompt:
    """``messages`` with the sources (best first) added to the system message, dropping the lowest-scored
    sources until the prompt fits ``max_prompt_tokens``. With no sources left, the messages are unchanged.

    Raises ``InvalidRequest`` (code ``context_length_exceeded``) when the messages alone do not fit.
    """
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError("a token budget needs count_tokens")
    kept = sorted(sources, key=lambda s: s.score, reverse=True)
    while True:
        assembled = _with_sources(messages, kept)
        if max_prompt_tokens is None or count_tokens is None:
            return RagPrompt(assembled, kept)
        used = sum(count_tokens(content_text(m.get("content"))) + MESSAGE_OVERHEAD_TOKENS for m in assembled)
        if used <= max_prompt_tokens:
            return RagPrompt(assembled, kept)
        if not kept:
            raise InvalidRequest(
                f"the messages take about {used} tokens, more than the {max_prompt_tokens} the prompt may have",
                param="messages",
                code="context_length_exceeded",
            )
        kept = kept[:-1]


def sources_block(sources: Sequence[Source]) -> str:
    """The instruction and the numbered sources, as the system message carries them."""
    numbered = [f"[{n}] {s.source} ({s.location})\n{s.text}" for n, s in enumerate(sources, 1)]
    return "\n\n".join([INSTRUCTION, *numbered])


def _with_sources(messages: Sequence[Message], sources: Sequence[Source]) -> list[Message]:
    out = [dict(m) for m in messages]
    if not sources:
        return out
    block = sources_block(sources)
    if out and out[0].get("role") == "system":
        # One system message: several chat templates accept a system message only in first place.
        content = out[0].get("content")
        if isinstance(content, list):
            out[0]["content"] = [*content, {"type": "text", "text": block}]
        else:
            out[0]["content"] = f"{content_text(content)}\n\n{block}"
        return out
    return [{"role": "system", "content": block}, *out]
