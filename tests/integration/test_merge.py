"""Merge-for-latency on the embedded model: a real PEFT adapter merged and checked, then served by its own vLLM.

`quiver deploy merged` starts a real vLLM with LoRA off (about a minute on this CPU); the official client
asks it; `quiver deploy rm` unregisters the deployment and stops the server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import BaseModelSpec, DeploymentStore, Registry
from adapters import merge as merging
from core import embedded

NAME = "merge-it"


@dataclass(frozen=True)
class Merged:
    """A data dir whose registry holds NAME@v1 and its recorded, equivalent merge."""

    data_dir: Path
    report: merging.MergeReport


def open_registry(data_dir: Path, base_model_dir: Path) -> Registry:
    spec = BaseModelSpec.from_model_dir(base_model_dir, embedded.SERVED_NAME)
    return Registry.open(f"sqlite:///{data_dir / 'registry.db'}", data_dir / "adapters", base=spec)


@pytest.fixture(scope="module")
def merged(
    base_model_dir: Path, lora_dirs: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Merged]:
    """NAME@v1 pushed and merged the way `quiver merge` does it (into DATA_DIR/merged/NAME@v1, then recorded)."""
    data_dir = tmp_path_factory.mktemp("merge") / "data"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared; one thread is several times faster here then
    try:
        with open_registry(data_dir, base_model_dir) as registry:
            version = registry.push_dir(NAME, lora_dirs[0]).version
            report = merging.merge_version(version, base_model_dir, data_dir / "merged" / version.lora_name)
            if report.saved:
                merges = DeploymentStore.beside(registry)
                merges.record_merge(version.name, version.number, report.path, report.to_json())
    finally:
        torch.set_num_threads(threads)
    yield Merged(data_dir, report)


def test_the_merged_embedded_model_is_equivalent_and_a_corrupted_one_is_not(
    merged: Merged, base_model_dir: Path, lora_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    report = merged.report
    assert report.equivalent and report.saved, report.to_json()
    assert report.equivalence.dtype == "bfloat16"  # the base's own precision
    assert all(check.identical for check in report.equivalence.checks)
    assert 0 < report.equivalence.max_logprob_diff <= merging.LOGPROB_TOLERANCE[torch.bfloat16]
    with open_registry(merged.data_dir, base_model_dir) as registry:
        recorded = DeploymentStore.beside(registry).latest_merge(NAME, 1)
    assert recorded is not None and recorded.equivalent and recorded.path == report.path
    assert recorded.report["max_logprob_diff"] == report.equivalence.max_logprob_diff

    corrupted = tmp_path / "corrupted"
    shutil.copytree(report.path, corrupted)
    weights = corrupted / "model.safetensors"
    weights.chmod(0o644)
    tensors = load_file(weights)
    key = "model.layers.10.mlp.down_proj.weight"
    tensors[key] = (tensors[key].float() * 1.2).to(tensors[key].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check = merging.check_equivalence(base_model_dir, lora_dirs[0], corrupted)
    finally:
        torch.set_num_threads(threads)
    assert not check.equivalent
    assert check.max_logprob_diff > merging.LOGPROB_TOLERANCE[torch.bfloat16]
