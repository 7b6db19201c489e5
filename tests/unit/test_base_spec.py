"""BaseModelSpec read from safetensors headers agrees with the model transformers builds from the same directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters import BaseModelSpec
from tests import factories as f

TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "sharded": {"tie_word_embeddings": False, "max_shard_size": "8KB"},
    "deeper-mha": {"num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 40},
}


@pytest.mark.parametrize("changes", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_header_spec_of_a_tiny_llama_equals_the_built_model(changes: dict[str, Any], tmp_path: Path) -> None:
    model_dir = f.save_tiny_llama(tmp_path, **changes)
    if "max_shard_size" in changes:
        assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    spec = BaseModelSpec.from_model_dir(model_dir, "tiny")
    assert spec == f.meta_device_spec(model_dir, "tiny")
    assert ("lm_head" in spec.embedding_modules) and spec.linear_shapes["lm_head"] == (32, 128)


def test_header_spec_of_the_embedded_model_equals_the_built_model(base_model_dir: Path) -> None:
    spec = BaseModelSpec.from_model_dir(base_model_dir, "smol")
    assert spec == f.meta_device_spec(base_model_dir, "smol")
    assert spec.linear_shapes["model.layers.29.self_attn.k_proj"] == (576, 192)
    assert spec.embedding_modules == {"model.embed_tokens", "lm_head"}  # tied: lm_head is not in the file


def test_a_model_dir_without_safetensors_weights_is_refused_by_name(tmp_path: Path) -> None:
    f.tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        BaseModelSpec.from_model_dir(tmp_path)
