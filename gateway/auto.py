"""``model="auto"``: the semantic router.

Each adapter with a description or example prompts (``quiver adapters set``) is represented by their
all-MiniLM-L6-v2 embeddings; a prompt goes to the adapter with the most similar one, if that
similarity reaches the threshold, else to the configured default. The embeddings are recomputed only
when the registry changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread

from adapters import Adapter, Catalog
from core.embeddings import Embedder

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


@dataclass(frozen=True)
class _Index:
    catalog: Catalog  # the snapshot (or a tenant's view of it) the index was built from
    owners: tuple[str, ...]  # the adapter each row describes
    vectors: NDArray[np.float32]


class SemanticRouter:
    """Picks the adapter whose description or examples best match a prompt."""

    def __init__(self, threshold: float, embedder: Embedder) -> None:
        self.threshold = threshold
        self._embedder = embedder
        # One index per catalog seen at the current revision: the snapshot, or a tenant's view of it.
        self._indexes: dict[int, _Index] = {}
        self._vectors: dict[str, NDArray[np.float32]] = {}  # text -> embedding, at the current revision
        self._lock = threading.Lock()

    async def choose(self, prompt: str, catalog: Catalog) -> tuple[str | None, float]:
        """The adapter name for ``prompt`` (None below the threshold) and the best similarity seen."""
        if not prompt.strip() or not any(_texts(a) for a in catalog.adapters.values()):
            return None, 0.0
        return await anyio.to_thread.run_sync(self._choose, prompt, catalog)

    def _choose(self, prompt: str, catalog: Catalog) -> tuple[str | None, float]:
        import numpy as np

        with self._lock:  # one model load and one index build, however many requests arrive at once
            embedder = self._embedder
            index = self._indexes.get(id(catalog))
            if index is None or index.catalog is not catalog:
                if any(i.catalog.revision != catalog.revision for i in self._indexes.values()):
                    self._indexes.clear()
                    self._vectors.clear()
                owners = [(a.name, t) for a in catalog.adapters.values() for t in _texts(a)]
                missing = list(dict.fromkeys(t for _, t in owners if t not in self._vectors))
                if missing:
                    self._vectors.update(zip(missing, embedder.encode(missing), strict=True))
                vectors = np.stack([self._vectors[t] for _, t in owners])
                index = self._indexes[id(catalog)] = _Index(catalog, tuple(n for n, _ in owners), vectors)
        scores = index.vectors @ embedder.encode([prompt])[0]
        best = int(np.argmax(scores))
        score = float(scores[best])
        return (index.owners[best] if score >= self.threshold else None), score


def _texts(adapter: Adapter) -> list[str]:
    routing = adapter.routing
    return ([routing.description] if routing.description else []) + list(routing.examples)
