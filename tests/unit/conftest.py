"""Fixtures shared by the unit tests: tiny models that run in milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters import BaseModelSpec
from core.embeddings import Embedder
from tests import factories


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny Llama, for building adapters."""
    return factories.tiny_llama_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a base model directory."""
    return factories.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def base(tiny_llama_dir: Path) -> BaseModelSpec:
    """The tiny Llama's layer shapes, as the registry checks adapters against them."""
    return BaseModelSpec.from_model_dir(tiny_llama_dir, "tiny-llama")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and lose several-fold when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base model directory with the embedded model's tokenizer and chat template, for training tests."""
    return factories.make_tiny_base(base_model_dir, tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def embedder(embeddings_dir: Path) -> Embedder:
    """The real all-MiniLM-L6-v2 embedder (ONNX Runtime, the prepared export), loaded once: RAG tests rank with it."""
    return Embedder(embeddings_dir)


@pytest.fixture
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA of a tiny llama, made for the test."""
    return factories.make_lora_adapter(factories.tiny_llama_model(), tmp_path_factory.mktemp("tiny") / "a")
