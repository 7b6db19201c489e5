"""Session fixtures: the embedded model, one real vLLM server, real PEFT adapters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import embedded, embedding_export
from core.vllm_server import VllmServer
from gateway import Settings
from tests.servers import GatewayServer, running_gateway, running_vllm

# The session's vLLM keeps this many adapters; gateways under test use fewer to exercise the LRU.
VLLM_MAX_LORAS = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, not failed, where CUDA is not available."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch  # only when GPU tests are collected: torch takes seconds to import

    if torch.cuda.is_available():
        return
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (built once, cached under ~/.cache/quiver)."""
    return embedded.prepare()


@pytest.fixture(scope="session")
def embeddings_dir() -> Path:
    """The ONNX export of all-MiniLM-L6-v2 that every Embedder loads (made once, cached under ~/.cache/quiver)."""
    return embedding_export.prepare()


@pytest.fixture(scope="session")
def vllm(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM server with runtime LoRA for the whole session."""
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with running_vllm(base_model_dir, log, max_loras=VLLM_MAX_LORAS, max_lora_rank=16) as server:
        yield server


@pytest.fixture
def settings(vllm: VllmServer, base_model_dir: Path, tmp_path: Path) -> Settings:
    """Gateway settings against the session vLLM, with a fresh registry per test."""
    return Settings(
        vllm_url=vllm.url,
        base_model=embedded.SERVED_NAME,
        base_model_path=base_model_dir,
        data_dir=tmp_path / "data",
        max_loras=2,
        health_interval_s=0.2,
        registry_refresh_s=0.2,
        # Worker processes only for the tests that train; the others need no idle process each.
        fine_tuning_workers=0,
    )


@pytest.fixture
def gateway(settings: Settings) -> Iterator[GatewayServer]:
    """A gateway on a free port in front of the session vLLM."""
    with running_gateway(settings) as server:
        yield server


@pytest.fixture
def unique_name() -> str:
    """Adapter names are unique per test: every test's registry shares the session's vLLM."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def lora_dirs(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three real PEFT LoRA adapters of the embedded model whose weights change greedy output."""
    from tests.factories import make_lora_adapter

    root = tmp_path_factory.mktemp("loras")
    return tuple(  # type: ignore[return-value]
        make_lora_adapter(base_model_dir, root / f"lora{seed}", rank=8, seed=seed) for seed in (1, 2, 3)
    )
