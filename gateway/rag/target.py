"""The RAG path as a routing target: which collections exist, and a request's retrieval-augmented form."""

from __future__ import annotations

import logging
from typing import Any

from core.errors import InvalidRequest
from gateway.polling import poll
from gateway.rag.retrieval import RagPath, question
from gateway.tokens import completion_budget

log = logging.getLogger("quiver.rag")


class RagTarget:
    """Serves ``rag:COLLECTION``: retrieves ``k`` sources for the last user message and puts them in the prompt.

    Collection names are read in the background, so routing never waits on the index; a collection
    ingested by the CLI is routable within one refresh interval.
    """

    def __init__(self, rag: RagPath, k: int = 4) -> None:
        self.rag = rag
        self.k = k
        self._names: frozenset[str] = frozenset()

    def has(self, collection: str) -> bool:
        return collection in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    async def refresh(self) -> None:
        """Read the index's collection names."""
        self._names = frozenset(c.name for c in await self.rag.acollections())

    async def watch(self, interval_s: float) -> None:
        """Refresh until cancelled."""
        await poll(self.refresh, interval_s, log, "reading the RAG collections failed; keeping the last list")

    async def augment(
        self, collection: str, payload: dict[str, Any], context_tokens: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``payload`` with the sources in its system message, and the sources as returned to the client."""
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise InvalidRequest("the RAG path answers chat completions (messages), not text completions")
        sources = await self.rag.aretrieve(collection, question(messages), self.k)
        budget = context_tokens - completion_budget(payload) if context_tokens is not None else None
        prompt = await self.rag.abuild_messages(messages, sources, budget)
        shown = [{"index": i + 1} | s.to_dict() for i, s in enumerate(prompt.sources)]
        return payload | {"messages": prompt.messages}, shown
