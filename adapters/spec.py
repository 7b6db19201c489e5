"""What the registry needs to know about the base model: the shape of every linear layer.

Read from the model directory's ``config.json`` and safetensors headers: no tensor data, no torch, so the
gateway can read it in a few milliseconds, for a base of any size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from adapters.tensorfile import read_header

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# A checkpoint does not say which 2-D weights are nn.Embedding rather than nn.Linear: these names do,
# for the architectures transformers has (Llama and its kin, GPT-2, GPT-NeoX, BLOOM, the original Llama).
INPUT_EMBEDDING_LEAVES = frozenset({"embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings"})
POSITION_EMBEDDING_LEAVES = frozenset({"wpe", "embed_positions", "position_embeddings"})
OUTPUT_EMBEDDING_LEAVES = frozenset({"lm_head", "embed_out"})
EMBEDDING_LEAVES = INPUT_EMBEDDING_LEAVES | OUTPUT_EMBEDDING_LEAVES
# Where a tied output embedding is not saved, transformers still builds it under this name.
TIED_OUTPUT_EMBEDDING = "lm_head"


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model's linear layers (module name -> (in_features, out_features)) and architecture.

    ``embedding_modules`` names the input and output embeddings (``model.embed_tokens``, ``lm_head``):
    they may be ``nn.Linear`` but vLLM serves LoRA here on the decoder's linear layers only.
    """

    name: str
    linear_shapes: Mapping[str, tuple[int, int]]
    architecture: str
    embedding_modules: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_model_dir(cls, path: Path, name: str | None = None) -> BaseModelSpec:
        """Read ``config.json`` and the safetensors header(s) under ``path``; ``name`` defaults to the path,
        as vLLM's ``--model`` does."""
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        architecture = str((config.get("architectures") or [config.get("model_type") or "unknown"])[0])
        return cls.from_weight_shapes(_weight_shapes(path), architecture, name if name is not None else str(path))

    @classmethod
    def from_weight_shapes(cls, shapes: Mapping[str, tuple[int, ...]], architecture: str, name: str) -> BaseModelSpec:
        """From a checkpoint's tensor shapes (tensor name -> shape): each 2-D ``<module>.weight`` outside
        the embeddings is a linear layer, stored (out_features, in_features) as ``nn.Linear`` keeps it."""
        linear_shapes: dict[str, tuple[int, int]] = {}
        embedding_modules: set[str] = set()
        input_embedding: tuple[int, ...] | None = None
        for tensor, shape in sorted(shapes.items()):
            module, _, kind = tensor.rpartition(".")
            leaf = module.rpartition(".")[2]
            if kind != "weight" or len(shape) != 2 or leaf in POSITION_EMBEDDING_LEAVES:
                continue
            if leaf in INPUT_EMBEDDING_LEAVES:
                embedding_modules.add(module)
                input_embedding = shape
                continue
            if leaf in OUTPUT_EMBEDDING_LEAVES:
                embedding_modules.add(module)
            linear_shapes[module] = (shape[1], shape[0])
        if input_embedding is not None and not embedding_modules & linear_shapes.keys():
            # Tied embeddings: the checkpoint keeps only the input one, the LM head is its transpose.
            vocab, hidden = input_embedding
            linear_shapes[TIED_OUTPUT_EMBEDDING] = (hidden, vocab)
            embedding_modules.add(TIED_OUTPUT_EMBEDDING)
        return cls(
            name=name,
            linear_shapes=MappingProxyType(linear_shapes),
            architecture=architecture,
            embedding_modules=frozenset(embedding_modules),
        )


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from ``model.safetensors`` or the shards its index names (headers only)."""
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"{path} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}: "
            "the base model's layer shapes are read from its safetensors weights"
        )
    return {name: entry.shape for file in files for name, entry in read_header(path / file).items()}
