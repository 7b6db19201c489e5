"""Random but real LoRA adapters: for benchmarks and tests that need many adapters and no training run.

PEFT initializes ``lora_B`` to zero (a no-op adapter); here A and B are drawn from a seed, with B's
standard deviation ``scale``, so each adapter really changes the model's greedy output, differently
per seed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def random_lora(
    base: Path | str | Any,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.2,
    rank_pattern: Mapping[str, int] | None = None,
) -> Path:
    """Save a LoRA adapter for ``base`` (a model directory, or an ``nn.Module``, left unmodified) in ``out_dir``."""
    options = {"alpha": alpha, "target_modules": target_modules, "scale": scale, "rank_pattern": rank_pattern}
    return random_loras(base, {out_dir: seed}, rank=rank, **options)[0]  # type: ignore[arg-type]


def random_loras(
    base: Path | str | Any,
    seeds: Mapping[Path, int],
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.2,
    rank_pattern: Mapping[str, int] | None = None,
) -> list[Path]:
    """One adapter per ``seeds`` entry (directory -> seed), from one PEFT model: a large base is wrapped once,
    not once per adapter. A model directory loads in fp32; an ``nn.Module`` is left unmodified."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if isinstance(base, torch.nn.Module):
        model = copy.deepcopy(base)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        rank_pattern=dict(rank_pattern or {}),
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():
        # Targeting a (tied) embedding is how tests make bad "LoRA on lm_head" adapters on purpose.
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`", category=UserWarning)
        peft_model = get_peft_model(model, config)
        lora = sorted((n, p) for n, p in peft_model.named_parameters() if "lora_" in n)
        for out_dir, seed in seeds.items():
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, param in lora:
                    if "lora_A" in name or "lora_embedding_A" in name:
                        drawn = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
                    elif "lora_B" in name or "lora_embedding_B" in name:
                        drawn = torch.randn(param.shape, generator=generator) * scale
                    else:
                        continue
                    param.copy_(drawn)
            out_dir.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(str(out_dir))
    return list(seeds)
