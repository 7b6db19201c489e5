"""What the registry needs to know about the base model: the shape of every linear layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig


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
        """Read ``config.json`` under ``path``; ``name`` defaults to the path, as vLLM's ``--model`` does."""
        # transformers and torch take seconds to import: only the commands that read a model pay for them.
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        return cls.from_config(cfg, name if name is not None else str(path))

    @classmethod
    def from_config(cls, cfg: PretrainedConfig, name: str) -> BaseModelSpec:
        """Build the model on the meta device to list its linear layers: any architecture, no memory."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
        embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
        linear_shapes: dict[str, tuple[int, int]] = {}
        embedding_modules: set[str] = set()
        for module_name, module in model.named_modules():
            if id(module) in embeddings:
                embedding_modules.add(module_name)
            if isinstance(module, torch.nn.Linear):
                linear_shapes[module_name] = (module.in_features, module.out_features)
        architectures = getattr(cfg, "architectures", None) or [type(model).__name__]
        return cls(
            name=name,
            linear_shapes=MappingProxyType(linear_shapes),
            architecture=str(architectures[0]),
            embedding_modules=frozenset(embedding_modules),
        )
